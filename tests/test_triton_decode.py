"""The Triton flash-decoding forward (`pyattn.launchers.triton_decode`) against the float64
reference, `pyattn.reference.attention`.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (tests/conftest.py),
where chunks are 64 keys long and at most 4 run per (batch, kv head, row block); the sizes
are chosen around that: Sk = 100 gives a second chunk shorter than a block, Sk = 700 four
chunks of three blocks with a ragged end, MQA 8/1 with Sq = 16 128 rows in 2 (float16) or
4 (float32) row blocks.

Tolerance: `assert_close_relative`: the kernel's error against float64 may be at most
twice the error of plain PyTorch on the same inputs with its output in the same dtype
(`reference.attention` computes in float32 and casts), plus the dtype's atol. lse's
-inf entries (rows that see no key) must match exactly. Every buffer the launcher
allocates with torch.empty is NaN-poisoned first, so an unwritten element fails.
"""
from __future__ import annotations

import math

import pytest
import torch

import pyattn
from pyattn.reference import attention as reference_attention
from pyattn.testing import assert_close, assert_close_relative

pytest.importorskip("triton")
if not torch.cuda.is_available():
    from pyattn._config import triton_interpret
    if not triton_interpret():
        pytest.skip("no CUDA device, and TRITON_INTERPRET=1 is not set", allow_module_level=True)

from pyattn.launchers.triton_decode import attention_decode_forward, num_splits_for, plan  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_empty")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NO_WINDOW = (-1, -1)

# B, Hq, Hkv, Sq, Sk, D, Dv
SHAPES = [
    (1, 4, 4, 1, 1, 32, 32),      # one key
    (2, 4, 2, 3, 100, 32, 32),    # GQA; chunks of 64 and 36 keys
    (1, 8, 1, 16, 100, 80, 80),   # MQA: 8 heads x 16 queries = 128 rows, two row blocks; D = 80 padded
    (1, 4, 2, 1, 700, 80, 48),    # Dv != D; four chunks, Sk a multiple of nothing
    (1, 4, 4, 3, 700, 32, 32),
    (1, 4, 1, 16, 5, 32, 32),     # Sq > Sk: causal rows 0..10 see no key
]

# name: (causal, window, softcap)
MASKS = {
    "full": (False, NO_WINDOW, 0.0),
    "causal": (True, NO_WINDOW, 0.0),
    "causal-win50": (True, (50, -1), 0.0),      # sliding window: early chunks skipped or fully masked
    "win7-2": (False, (7, 2), 0.0),            # keys past the diagonal, rows with different ranges
    "cap5": (False, NO_WINDOW, 5.0),
    "causal-cap30-win300": (True, (300, -1), 30.0),
}


def shape_id(shape) -> str:
    b, hq, hkv, sq, sk, d, dv = shape
    heads = f"H{hq}" if hq == hkv else f"H{hq}/{hkv}"
    dims = f"D{d}" if d == dv else f"D{d}-Dv{dv}"
    return f"B{b}-{heads}-Sq{sq}-Sk{sk}-{dims}"


def make_inputs(shape, dtype=torch.float32, layout="bhsd", seed=0, device=DEVICE):
    """q, k, v of `shape`. layout "bshd": k and v are the first Sk positions of a (B, S_max, H, D)
    KV-cache buffer seen through .transpose(1, 2) (no copy), q a (B, Sq, H, D) buffer likewise."""
    b, hq, hkv, sq, sk, d, dv = shape
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(heads, seq, dim, capacity):
        if layout == "bshd":
            buf = torch.randn(b, capacity, heads, dim, generator=gen, device=device, dtype=dtype)
            return buf[:, :seq].transpose(1, 2)
        return torch.randn(b, heads, seq, dim, generator=gen, device=device, dtype=dtype)

    return rand(hq, sq, d, sq), rand(hkv, sk, d, sk + 37), rand(hkv, sk, dv, sk + 37)


def check(q, k, v, attn_bias=None, *, scale=None, causal=False, window=NO_WINDOW, softcap=0.0, num_splits=None,
          factor=2.0):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = attention_decode_forward(q, k, v, attn_bias, scale=scale, causal=causal, window_left=window[0],
                                        window_right=window[1], softcap=softcap, num_splits=num_splits)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    kwargs = dict(causal=causal, scale=scale, window=window, softcap=softcap, return_lse=True)
    bias64 = attn_bias if attn_bias is None or attn_bias.dtype == torch.bool else attn_bias.double()
    ref_out, ref_lse = reference_attention(q.double(), k.double(), v.double(), attn_bias=bias64, **kwargs)
    base_out, base_lse = reference_attention(q, k, v, attn_bias=attn_bias, **kwargs)
    assert_close_relative(out, ref_out, base_out, name="out", factor=factor)
    assert_close_relative(lse, ref_lse, base_lse, name="lse", factor=factor)
    return out, lse


# float32 runs every mask; float16 the causal ones (interpreter time)
CASES = ([(shape, mask, torch.float32) for shape in SHAPES for mask in MASKS]
         + [(shape, mask, torch.float16) for shape in SHAPES for mask in ("causal", "causal-cap30-win300")])


def case_id(case) -> str:
    shape, mask, dtype = case
    return f"{shape_id(shape)}-{mask}-{str(dtype).replace('torch.float', 'fp')}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case):
    shape, mask, dtype = case
    causal, window, softcap = MASKS[mask]
    check(*make_inputs(shape, dtype), causal=causal, window=window, softcap=softcap)


@pytest.mark.parametrize("shape", [(2, 4, 2, 3, 100, 80, 48), (1, 8, 1, 16, 700, 32, 32)], ids=shape_id)
def test_kv_cache_views(shape):
    """k, v (and q) as (B, S, H, D) buffers viewed with .transpose(1, 2), with spare cache capacity."""
    q, k, v = make_inputs(shape, layout="bshd")
    assert k.stride(1) == k.shape[-1] and k.stride(2) == k.shape[1] * k.shape[-1]  # (B, S, H, D) strides
    check(q, k, v, causal=True, window=(200, -1))


@pytest.mark.parametrize("num_splits", [1, 2, 3, 11])
def test_any_number_of_splits(num_splits):
    """Forced chunk counts agree (11 = one block per chunk, 1 = no combine kernel)."""
    q, k, v = make_inputs((1, 4, 2, 3, 700, 32, 32))
    out, lse = check(q, k, v, causal=True, num_splits=num_splits)
    assert plan(q, k, v, causal=True, window_left=-1, window_right=-1, num_splits=num_splits).num_splits == num_splits


def test_rows_with_fully_masked_chunks():
    """Window (2, 0) with Sq = 16 over Sk = 70: row 0 sees keys 52..54 (chunk 0 only), row 15 keys
    67..69 (chunk 1 only); each row has one chunk that hides every key (lse_s = -inf)."""
    q, k, v = make_inputs((1, 4, 2, 16, 70, 32, 32))
    p = plan(q, k, v, causal=False, window_left=2, window_right=0)
    assert p.num_splits == 2 and p.chunk == 64
    check(q, k, v, window=(2, 0))


def test_chunks_hidden_by_a_bool_mask():
    """A key-padding mask that hides the first 300 keys: chunks 0 and 1 see nothing for every row;
    batch 1 hides every key: zeros and lse -inf."""
    shape = (2, 4, 2, 3, 700, 32, 32)
    keep = torch.zeros(2, 1, 1, 700, dtype=torch.bool, device=DEVICE)
    keep[0, ..., 300:] = True
    out, lse = check(*make_inputs(shape), keep)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    assert torch.isfinite(lse[0]).all()


BIAS_SHAPES = [(2, 4, 3, 100), (1, 4, 1, 100), (2, 1, 3, 1), (1, 1, 1, 100), (2, 1, 1, 100)]


@pytest.mark.parametrize("bias_shape", BIAS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_attn_bias_broadcast(bias_shape, kind):
    shape = (2, 4, 2, 3, 100, 32, 32)
    q, k, v = make_inputs(shape)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    if kind == "float":
        bias = torch.randn(bias_shape, generator=gen, device=DEVICE)
    else:
        bias = torch.rand(bias_shape, generator=gen, device=DEVICE) > 0.3
    check(q, k, v, bias, causal=True)


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_float_bias_with_minus_inf_in_half(bias_dtype):
    """A float32 or float16 bias on float16 inputs, -inf hiding a whole head and some keys, broadcast
    by stride 0 (expand) without size-1 dims, with softcap and a window."""
    shape = (1, 8, 1, 16, 100, 80, 80)
    q, k, v = make_inputs(shape, torch.float16)
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    bias = torch.randn(1, 8, 1, 100, generator=gen, device=DEVICE).to(bias_dtype)
    bias[..., ::3] = float("-inf")
    bias[:, 5] = float("-inf")
    bias = bias.expand(1, 8, 16, 100)
    out, lse = check(q, k, v, bias, softcap=10.0, window=(40, 5))
    assert torch.all(out[:, 5] == 0) and torch.all(lse[:, 5] == float("-inf"))


def test_bfloat16():
    """bfloat16 (the interpreter upcasts tl.dot operands to float32: triton#11584)."""
    q, k, v = make_inputs((1, 4, 2, 3, 100, 32, 32), torch.bfloat16)
    check(q, k, v, causal=True)


def test_scale_and_one_query_row():
    q, k, v = make_inputs((2, 4, 4, 1, 100, 32, 32))
    check(q, k, v, scale=0.3)


@pytest.mark.parametrize("sizes", [(1, 4, 2, 3, 0), (1, 4, 2, 0, 10), (0, 4, 2, 3, 10)], ids=str)
def test_empty(sizes):
    """Sk = 0: zeros and lse -inf; Sq = 0 or B = 0: empty outputs."""
    b, hq, hkv, sq, sk = sizes
    q, k, v = make_inputs((b, hq, hkv, sq, sk, 32, 48))
    out, lse = attention_decode_forward(q, k, v, None, scale=1.0, causal=True, window_left=-1, window_right=-1,
                                        softcap=0.0)
    assert out.shape == (b, hq, sq, 48) and lse.shape == (b, hq, sq)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_window_leaves_no_key():
    """A window to the right of every key (left = 0, right = 0 with Sq > Sk and no causal) for some rows,
    and a window before key 0 for others."""
    q, k, v = make_inputs((1, 4, 4, 16, 3, 32, 32))
    check(q, k, v, window=(0, 0))


def test_plan_skips_keys_outside_the_window():
    """The chunks cover only the keys some row may see: a 100-key window over 1M keys walks 2-3 blocks."""
    q, k, v = (torch.empty(1, 8, 4, 128, device="meta"), torch.empty(1, 2, 1 << 20, 128, device="meta"),
               torch.empty(1, 2, 1 << 20, 128, device="meta"))
    p = plan(q, k, v, causal=True, window_left=100, window_right=-1, num_splits=8)
    assert p.kv_end == 1 << 20 and (1 << 20) - p.kv_start <= 100 + 4 + p.block_n
    assert p.num_splits * p.chunk >= p.kv_end - p.kv_start
    p = plan(q, k, v, causal=True, window_left=-1, window_right=-1, num_splits=8)
    assert p.kv_start == 0 and p.num_splits == 8 and p.full_hi == (1 << 20) - 3


def test_num_splits_heuristic():
    # few programs, long cache: about two programs per SM
    assert num_splits_for(work=8, num_blocks=512, sm_count=132) == 33
    # enough programs already: no split
    assert num_splits_for(work=512, num_blocks=512, sm_count=132) == 1
    # short cache: at least 4 blocks per chunk
    assert num_splits_for(work=1, num_blocks=10, sm_count=132) == 2
    # capped
    assert num_splits_for(work=1, num_blocks=1 << 16, sm_count=132) == 128
    assert num_splits_for(work=8, num_blocks=0, sm_count=132) == 1


# --------------------------------------------------------------------------- GPU (run with -m gpu)

GPU_SHAPES = [
    (4, 32, 8, 1, 32768, 128, 128),
    (2, 32, 8, 4, 65536, 128, 128),
    (1, 32, 8, 16, 32768, 128, 128),
    (1, 16, 2, 1, 262144, 128, 128),
    (1, 8, 1, 1, 100000, 256, 256),
    (2, 16, 4, 2, 40001, 96, 80),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_long_cache(shape, dtype):
    q, k, v = make_inputs(shape, dtype, layout="bshd")
    assert plan(q, k, v, causal=True, window_left=-1, window_right=-1).num_splits > 1
    check(q, k, v, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("mask", ["causal-win50", "cap5", "causal-cap30-win300"])
def test_gpu_masks(mask):
    causal, window, softcap = MASKS[mask]
    q, k, v = make_inputs((2, 32, 8, 3, 32768, 128, 128), torch.bfloat16, layout="bshd")
    check(q, k, v, causal=causal, window=window, softcap=softcap)


@pytest.mark.gpu
def test_gpu_bias_and_float32():
    q, k, v = make_inputs((2, 32, 8, 2, 32768, 128, 128), torch.float32)
    keep = torch.rand(2, 1, 1, 32768, device=DEVICE) > 0.5
    check(q, k, v, keep, causal=True)
    bias = torch.randn(2, 32, 2, 32768, device=DEVICE)
    check(q, k, v, bias, causal=True)


@pytest.mark.gpu
def test_gpu_one_million_keys():
    q, k, v = make_inputs((1, 8, 1, 1, 1 << 20, 128, 128), torch.bfloat16, layout="bshd")
    out, lse = attention_decode_forward(q, k, v, None, scale=128 ** -0.5, causal=True, window_left=-1,
                                        window_right=-1, softcap=0.0)
    ref_out, ref_lse = reference_attention(q.float(), k.float(), v.float(), causal=True, return_lse=True)
    assert_close(out, ref_out, torch.bfloat16, name="out")
    assert_close(lse, ref_lse, torch.float32, name="lse", factor=10.0)
    assert math.isfinite(lse.sum().item())


@pytest.mark.parametrize("grad", [False, True], ids=["infer", "train"])
def test_public_attention_runs_decode_for_few_queries(grad, monkeypatch):
    """pyattn.attention(backend="triton") hands seq_q <= 16 over >= 256 keys to the decode kernel;
    the regular backward then runs from its out and lse."""
    from pyattn.launchers import triton_decode

    calls = []
    real = triton_decode.attention_decode_forward
    monkeypatch.setattr(triton_decode, "attention_decode_forward",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(0)
    q = torch.randn(1, 4, 2, 32, requires_grad=grad)
    k, v = (torch.randn(1, 2, 300, 32, requires_grad=grad) for _ in range(2))
    out, lse = pyattn.attention(q, k, v, causal=True, return_lse=True, backend="triton")
    assert calls, "the decode kernel did not run"
    want, want_lse = pyattn.reference.attention(*(x.double() for x in (q, k, v)), causal=True, return_lse=True)
    assert_close(out, want.float(), torch.float32)
    assert_close(lse, want_lse.float(), torch.float32)
    if grad:
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        wants = torch.autograd.grad(pyattn.reference.attention(q, k, v, causal=True).sum(), (q, k, v))
        for g, w in zip(grads, wants):
            assert_close(g, w, torch.float32)
