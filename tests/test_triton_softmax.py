"""The Triton softmax attention kernels (`pyattn.kernels.softmax`), forward and backward,
against the float64 reference `pyattn.reference.attention` / `attention_varlen`.

Without a GPU they run on CPU tensors under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); the `gpu` tests run bfloat16 and long sequences on a CUDA device.

Tolerance: `pyattn.testing.assert_close_relative`: the kernel's error against the float64
reference may be at most twice the error of plain PyTorch computing the same attention in the
kernel's dtype (`pyattn.reference._softmax_attention` on the un-upcast inputs), plus the dtype's
atol. Every check also requires the same NaN/inf pattern as the reference (lse = -inf exactly
where a row sees no key). Gradients include the gradient of lse. Buffers the kernels should
overwrite are NaN-poisoned (`poison_empty`).
"""
from __future__ import annotations

import pytest
import torch

import pyattn
from pyattn import reference as ref
from pyattn.dispatch import triton as triton_backend
from pyattn.testing import assert_close

from attention_checks import DTYPE_IDS, _grads, check_attention as _check_attention, make_qkv  # noqa: E402

pytestmark = pytest.mark.skipif(triton_backend.unavailable() is not None,
                                reason=f"Triton backend: {triton_backend.unavailable()}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check_attention(q, k, v, **kw):
    return _check_attention(q, k, v, backend="triton", **kw)


# --------------------------------------------------------------------------- dense grid

# name: (B, Hq, Hkv, Sq, Sk, D, Dv, layout, kwargs) -- a pairwise-style grid: every feature, GQA and
# MQA, odd lengths (37, 97, 130 are not multiples of the 64-blocks), Sq < Sk and Sq > Sk, both layouts.
CASES = {
    "plain": (2, 2, 2, 64, 64, 32, 32, "bhsd", {}),
    "causal-Sq<Sk": (1, 4, 2, 37, 130, 32, 32, "bshd", dict(causal=True)),
    "causal-Sq>Sk": (2, 2, 2, 130, 37, 16, 16, "bhsd", dict(causal=True)),  # rows 0..92 see no key
    "window": (1, 2, 2, 97, 97, 16, 16, "bshd", dict(window=(20, 5))),
    "causal-window-mqa": (1, 4, 1, 130, 97, 32, 32, "bhsd", dict(causal=True, window=(40, -1))),
    "softcap-gqa": (2, 4, 2, 64, 97, 32, 32, "bshd", dict(softcap=5.0, scale=0.5)),
    "D80-Dv48-gqa": (1, 4, 2, 97, 64, 80, 48, "bshd", {}),
    "one-query-mqa": (2, 4, 1, 1, 130, 32, 32, "bhsd", dict(causal=True)),
    "right-window-softcap": (1, 2, 2, 37, 97, 16, 16, "bhsd", dict(window=(-1, 3), softcap=2.0)),
}


def case_id(name, case, dtype):
    b, hq, hkv, sq, sk, d, dv, layout, _ = case
    heads = f"H{hq}" if hq == hkv else f"H{hq}/{hkv}"
    dims = f"D{d}" if d == dv else f"D{d}-Dv{dv}"
    return f"{name}-B{b}-{heads}-Sq{sq}-Sk{sk}-{dims}-{layout}-{DTYPE_IDS[dtype]}"


GRID = [(name, dtype) for name in CASES for dtype in (torch.float32, torch.float16)]


@pytest.mark.parametrize("name,dtype", GRID, ids=[case_id(n, CASES[n], d) for n, d in GRID])
def test_dense(name, dtype, poison_empty):
    b, hq, hkv, sq, sk, d, dv, layout, kw = CASES[name]
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dv, dtype, layout=layout)
    if layout == "bshd":
        assert not q.is_contiguous()
    check_attention(q, k, v, **dict(kw))


def test_bfloat16_under_interpreter_or_gpu(poison_empty):
    """bfloat16 tl.dot is upcast under the interpreter (triton#11584); on a GPU it is native."""
    q, k, v = make_qkv(1, 4, 2, 97, 64, 32, 32, torch.bfloat16, layout="bshd")
    check_attention(q, k, v, causal=True)


@pytest.mark.parametrize("config", [dict(BLOCK_M=16, BLOCK_N=32), dict(BLOCK_M=32, BLOCK_N=16)],
                         ids=["M16-N32", "M32-N16"])
def test_block_shapes(config, poison_empty):
    """Block sizes other than the interpreter's 64x64 (BLOCK_M != BLOCK_N): the skipped, masked and
    unmasked key blocks of the causal/window loops, in forward, dK/dV and dQ."""
    from pyattn.launchers import triton_softmax

    q, k, v = (x.detach() for x in make_qkv(1, 2, 1, 83, 71, 16, 16, torch.float32, seed=3))
    out, lse = torch.empty(1, 2, 83, 16), torch.empty(1, 2, 83)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    g, g_lse = torch.randn_like(out), torch.randn_like(lse)
    for causal, window in [(True, (9, -1)), (False, (3, 20)), (False, (-1, -1))]:
        params = dict(scale=0.3, causal=causal, window_left=window[0], window_right=window[1], softcap=0.0,
                      dropout_p=0.0)
        triton_softmax.softmax_forward(q, k, v, None, None, out, lse, config=config, **params)
        triton_softmax.softmax_backward(g, g_lse, q, k, v, None, None, out, lse, dq, dk, dv, None, config=config,
                                        **params)
        q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
        ref_out, ref_lse = ref.attention(q64, k64, v64, causal=causal, window=window, scale=0.3, return_lse=True)
        ref_grads = _grads(ref_out, ref_lse, [q64, k64, v64], g.double(), g_lse.double())
        for name, a, e in [("out", out, ref_out), ("lse", lse, ref_lse), ("dq", dq, ref_grads[0]),
                           ("dk", dk, ref_grads[1]), ("dv", dv, ref_grads[2])]:
            assert_close(a, e, torch.float32, name=f"{name} causal={causal} window={window}")


# --------------------------------------------------------------------------- bias and masks

@pytest.mark.parametrize("bias_shape,kw", [
    ((1, 4, 37, 97), dict(causal=True)),
    ((2, 1, 1, 97), dict(window=(30, 10))),
    ((37, 97), dict(softcap=4.0)),
], ids=["1-H-Sq-Sk-causal", "B-1-1-Sk-window", "Sq-Sk-softcap"])
def test_float_bias_with_grad(bias_shape, kw, poison_empty):
    q, k, v = make_qkv(2, 4, 2, 37, 97, 32, 32, torch.float32, layout="bshd")
    bias = torch.randn(bias_shape, device=DEVICE).requires_grad_()
    check_attention(q, k, v, attn_bias=bias, **kw)


def test_float32_bias_on_float16_inputs(poison_empty):
    q, k, v = make_qkv(1, 2, 2, 64, 97, 16, 16, torch.float16)
    bias = (2 * torch.randn(1, 2, 64, 97, device=DEVICE)).requires_grad_()
    check_attention(q, k, v, attn_bias=bias, causal=True)


def test_bias_without_grad_and_minus_inf(poison_empty):
    """A float bias that needs no gradient; -inf entries hide keys, a row of -inf sees none."""
    q, k, v = make_qkv(1, 2, 1, 37, 64, 16, 16, torch.float32)
    bias = torch.randn(1, 2, 37, 64, device=DEVICE)
    bias[:, :, 5] = float("-inf")
    bias[:, :, 9, :30] = float("-inf")
    out, lse = check_attention(q, k, v, attn_bias=bias)
    assert bool(torch.isneginf(lse[:, :, 5]).all()) and bool((out[:, :, 5] == 0).all())


def test_bool_mask_with_empty_rows(poison_empty):
    """True = keep; a row whose mask is all False outputs zeros, lse -inf, and zero gradients."""
    q, k, v = make_qkv(2, 4, 2, 97, 64, 32, 32, torch.float32, layout="bshd")
    gen = torch.Generator().manual_seed(5)
    mask = (torch.rand(2, 1, 97, 64, generator=gen) > 0.3).to(DEVICE)
    mask[1, 0, 40] = False
    out, lse = check_attention(q, k, v, attn_bias=mask, causal=True)
    assert bool(torch.isneginf(lse[1, :, 40]).all()) and bool((out[1, :, 40] == 0).all())


def test_fully_masked_rows_give_zero_grads(poison_empty):
    """Rows that see no key (causal with Sq > Sk): zeros, lse -inf, zero dq there, no NaN anywhere."""
    q, k, v = make_qkv(1, 2, 2, 70, 20, 16, 16, torch.float32)
    out, lse = pyattn.attention(q, k, v, causal=True, return_lse=True, backend="triton")
    assert bool((out[:, :, :50] == 0).all()) and bool(torch.isneginf(lse[:, :, :50]).all())
    out.sum().backward()
    for x in (q, k, v):
        assert not torch.isnan(x.grad).any()
    assert bool((q.grad[:, :, :50] == 0).all())


# --------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_dropout_matches_reference_mask(dtype, poison_empty):
    """The kernels draw `pyattn.reference.dropout_keep_mask` with the same seed, forward and backward."""
    q, k, v = make_qkv(1, 4, 2, 97, 64, 32, 32, dtype, layout="bshd")
    check_attention(q, k, v, dropout_p=0.3, causal=True)


def test_dropout_with_bias_and_softcap(poison_empty):
    q, k, v = make_qkv(1, 2, 2, 37, 97, 16, 16, torch.float32)
    bias = torch.randn(1, 1, 37, 97, device=DEVICE).requires_grad_()
    check_attention(q, k, v, attn_bias=bias, dropout_p=0.5, softcap=3.0, window=(50, 0))


def test_dropout_follows_manual_seed(poison_empty):
    q, k, v = (x.detach() for x in make_qkv(1, 2, 2, 37, 64, 16, 16, torch.float32))
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(pyattn.attention(q, k, v, dropout_p=0.4, backend="triton"))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    # the kept fraction is about 1 - p
    plain = pyattn.attention(q, k, v, backend="triton")
    assert not torch.equal(outs[0], plain)


def test_dropout_kernel_with_explicit_seed(poison_empty):
    """The backend reads the seed from an int64 tensor (a 64-bit seed: both Philox key words)."""
    q, k, v = (x.detach() for x in make_qkv(1, 2, 1, 64, 37, 16, 16, torch.float32))
    seed = (1 << 62) + 12345
    out, lse = triton_backend.attention_forward(
        (q, k, v, None), dropout_seed=torch.tensor(seed, dtype=torch.int64), causal=False, scale=0.25,
        window_left=-1, window_right=-1, softcap=0.0, dropout_p=0.2)
    ref_out, ref_lse = ref.attention(q.double(), k.double(), v.double(), scale=0.25, dropout_p=0.2,
                                     dropout_seed=seed, return_lse=True)
    assert_close(out, ref_out, torch.float32, name="out")
    assert_close(lse, ref_lse, torch.float32, name="lse")


# --------------------------------------------------------------------------- empty and odd inputs

@pytest.mark.parametrize("sq,sk", [(0, 9), (7, 0), (0, 0)], ids=["Sq0", "Sk0", "Sq0-Sk0"])
def test_empty_sequences(sq, sk, poison_empty):
    q, k, v = make_qkv(2, 4, 2, sq, sk, 16, 8, torch.float32)
    out, lse = pyattn.attention(q, k, v, causal=True, return_lse=True, backend="triton")
    assert out.shape == (2, 4, sq, 8) and lse.shape == (2, 4, sq)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, float("-inf")))
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    for x in (q, k, v):
        assert x.grad.shape == x.shape and torch.equal(x.grad, torch.zeros_like(x))


def test_strided_outputs_and_broadcast_inputs(poison_empty):
    """The launcher writes through any output strides (a BSHD out buffer, an lse slice) and reads
    stride-0 (expanded) inputs."""
    from pyattn.launchers import triton_softmax

    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 1, 45, 32, generator=gen).expand(2, 4, 45, 32)
    k = torch.randn(1, 2, 70, 32, generator=gen).expand(2, 2, 70, 32)
    v = torch.randn(2, 70, 2, 24, generator=gen).transpose(1, 2)
    out = torch.full((2, 45, 4, 24), float("nan")).transpose(1, 2)
    lse_buffer = torch.full((2, 4, 45, 2), float("nan"))
    triton_softmax.softmax_forward(q, k, v, None, None, out, lse_buffer[..., 0], scale=0.2, causal=True,
                                   window_left=-1, window_right=-1, softcap=0.0, dropout_p=0.0)
    ref_out, ref_lse = ref.attention(q.double(), k.double(), v.double(), causal=True, scale=0.2, return_lse=True)
    assert_close(out, ref_out, torch.float32, name="out")
    assert_close(lse_buffer[..., 0], ref_lse, torch.float32, name="lse")
    assert bool(torch.isnan(lse_buffer[..., 1]).all()), "wrote outside the lse view"


def test_only_some_inputs_need_grad(poison_empty):
    q, k, v = make_qkv(1, 4, 2, 37, 64, 16, 16, torch.float32)
    k.requires_grad_(False)
    check_attention(q, k, v, causal=True)


# --------------------------------------------------------------------------- varlen

def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def check_varlen(q, k, v, lens_q, lens_k, *, dropout_p=0.0, factor=2.0, **kw):
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    max_q, max_k = max(lens_q), max(lens_k)
    torch.manual_seed(99)
    out, lse = pyattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p, return_lse=True,
                                       backend="triton", **kw)
    torch.manual_seed(99)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    assert out.shape == q.shape[:-1] + (v.shape[-1],) and lse.shape == (q.shape[1], q.shape[0])
    gen = torch.Generator().manual_seed(7)
    g_out, g_lse = torch.randn(out.shape, generator=gen).to(out), torch.randn(lse.shape, generator=gen).to(lse)
    doubles = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = ref.attention_varlen(*doubles, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p,
                                            dropout_seed=seed, return_lse=True, **kw)
    assert_close(out, ref_out, q.dtype, name="out", factor=factor)
    assert_close(lse, ref_lse, torch.float32, name="lse")
    grads = _grads(out, lse, [q, k, v], g_out, g_lse)
    ref_grads = _grads(ref_out, ref_lse, doubles, g_out.double(), g_lse.double())
    for name, g, r in zip(["dq", "dk", "dv"], grads, ref_grads):
        assert_close(g, r, q.dtype, name=name, factor=factor)


VARLEN = {
    # name: (Hq, Hkv, D, Dv, lens_q, lens_k, kwargs); empty sequences on either side
    "causal": (4, 2, 32, 32, [37, 0, 70, 1], [50, 5, 70, 0], dict(causal=True)),
    "window-softcap-mqa": (4, 1, 16, 24, [20, 64, 3], [20, 97, 0], dict(window=(10, 3), softcap=3.0)),
    "dropout": (2, 2, 16, 16, [30, 1, 45], [40, 0, 45], dict(causal=True, dropout_p=0.3)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", list(VARLEN))
def test_varlen(name, dtype, poison_empty):
    hq, hkv, d, dv, lens_q, lens_k, kw = VARLEN[name]
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(sum(lens_q), hq, d, generator=gen).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(sum(lens_k), hkv, d, generator=gen).to(DEVICE, dtype).requires_grad_()
    # v from a (Dv, total, H) buffer: strides unlike q's
    v = torch.randn(dv, sum(lens_k), hkv, generator=gen).to(DEVICE, dtype).permute(1, 2, 0).requires_grad_()
    check_varlen(q, k, v, lens_q, lens_k, factor=2.0 if dtype == torch.float32 else 3.0, **kw)


def test_varlen_trailing_rows(poison_empty):
    """Packed rows past cu_seqlens[-1] belong to no sequence: zeros, lse -inf, zero gradients
    (the public op rejects such inputs; the backend handles them)."""
    lens_q, lens_k = [37, 0, 20], [40, 3, 20]
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(sum(lens_q) + 9, 2, 16, generator=gen).to(DEVICE)
    k = torch.randn(sum(lens_k) + 5, 1, 16, generator=gen).to(DEVICE)
    v = torch.randn(sum(lens_k) + 5, 1, 16, generator=gen).to(DEVICE)
    params = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=37, max_seqlen_k=40, dropout_seed=None,
                  causal=True, scale=0.25, window_left=-1, window_right=-1, softcap=0.0, dropout_p=0.0)
    out, lse = triton_backend.attention_varlen_forward((q, k, v), **params)
    doubles = [x.double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = ref.attention_varlen(*doubles, cu_q, cu_k, 37, 40, causal=True, scale=0.25, return_lse=True)
    assert_close(out, ref_out, torch.float32, name="out")
    assert_close(lse, ref_lse, torch.float32, name="lse")
    assert bool((out[-9:] == 0).all()) and bool(torch.isneginf(lse[:, -9:]).all())
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    dq, dk, dv = triton_backend.attention_varlen_backward((g_out, g_lse), (q, k, v), (out, lse), (True, True, True),
                                                          **params)
    ref_grads = _grads(ref_out, ref_lse, doubles, g_out.double(), g_lse.double())
    for name, g, r in zip(["dq", "dk", "dv"], (dq, dk, dv), ref_grads):
        assert_close(g, r, torch.float32, name=name)
    assert bool((dq[-9:] == 0).all()) and bool((dk[-5:] == 0).all()) and bool((dv[-5:] == 0).all())


# --------------------------------------------------------------------------- dispatch

def test_backend_choice(no_default_backend):
    q, k, v = make_qkv(1, 2, 2, 5, 5, 16, 16, torch.float32, device="cpu")
    if not torch.cuda.is_available():
        # the interpreter runs only when named: backend=None takes a fast CPU path
        plan = pyattn.explain(pyattn.attention, q, k, v)
        assert plan.backend != "triton" and "interpreter" in dict(plan.passed_over)["triton"]
    assert pyattn.explain(pyattn.attention, q, k, v, backend="triton").backend == "triton"
    with pytest.raises(NotImplementedError, match="float16/bfloat16/float32"):
        pyattn.attention(*(x.double() for x in (q, k, v)), backend="triton")
    big = torch.randn(1, 1, 3, 320)
    with pytest.raises(NotImplementedError, match="head dims up to 256"):
        pyattn.attention(big, big, big, backend="triton")


# --------------------------------------------------------------------------- GPU

GPU_CASES = [
    # B, Hq, Hkv, S, D, causal, dtype
    (2, 8, 8, 1024, 64, False, torch.bfloat16),
    (1, 8, 2, 2048, 128, True, torch.bfloat16),
    (1, 4, 4, 4096, 64, True, torch.float16),
    (2, 4, 1, 1023, 128, False, torch.float16),
    (1, 4, 4, 1024, 128, True, torch.float32),
    (1, 4, 2, 1000, 256, True, torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"B{c[0]}-H{c[1]}/{c[2]}-S{c[3]}-D{c[4]}-"
                                                          f"{'causal' if c[5] else 'full'}-{DTYPE_IDS[c[6]]}")
def test_gpu_long(case):
    b, hq, hkv, s, d, causal, dtype = case
    q, k, v = make_qkv(b, hq, hkv, s, s, d, d, dtype, layout="bshd", device="cuda")
    check_attention(q, k, v, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_gpu_features(dtype):
    q, k, v = make_qkv(2, 8, 2, 777, 1025, 96, 64, dtype, layout="bshd", device="cuda")
    bias = torch.randn(1, 8, 777, 1025, device="cuda", dtype=dtype).requires_grad_()
    check_attention(q, k, v, attn_bias=bias, causal=True, window=(256, -1), softcap=20.0, dropout_p=0.1)


@pytest.mark.gpu
def test_gpu_varlen():
    lens_q, lens_k = [1000, 0, 1, 513, 2048], [1000, 7, 300, 513, 2048]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lens_q), 8, 128, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    k = torch.randn(sum(lens_k), 2, 128, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    v = torch.randn(sum(lens_k), 2, 128, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    check_varlen(q, k, v, lens_q, lens_k, causal=True, factor=2.0)


# --------------------------------------------------------------------------- custom op

def test_opcheck_and_compile(no_default_backend):
    """On the Triton backend the custom op passes opcheck's schema and fake-tensor checks (outputs
    alias no input, the fake matches), and torch.compile(fullgraph=True) traces it, backward too.
    (aot_dispatch_dynamic is left to tests/test_compile.py: it is backend-independent and slow here.)"""
    from pyattn.ops import softmax

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 9, 16, generator=gen).to(DEVICE).requires_grad_() for h in (4, 2, 2))
    bias = torch.randn(1, 4, 9, 9, generator=gen).to(DEVICE).requires_grad_()
    params = (torch.tensor(5, dtype=torch.int64), True, 0.3, -1, -1, 2.0, 0.25, "triton")
    torch.library.opcheck(softmax._ATTENTION.forward_op, (q, k, v, bias, *params),
                          test_utils=("test_schema", "test_faketensor"))

    torch._dynamo.reset()
    fn = lambda q, k, v: pyattn.attention(q, k, v, causal=True, window=(4, 0), backend="triton")  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))
    (g_expected,) = torch.autograd.grad(fn(q, k, v).sum(), q)
    (g_got,) = torch.autograd.grad(compiled(q, k, v).sum(), q)
    torch.testing.assert_close(g_got, g_expected)
