"""The C++ CPU softmax attention (pyattn._C), forward and backward, against the float64
reference (`pyattn.reference`).

Two rules: the launcher-level forward tests use `pyattn.testing.assert_close` with float32's
rule at factor 0.5 (atol 1e-5, rtol 1e-4; the kernel accumulates in float32, its errors
measure ~1e-6 here); the public-API tests (`pyattn.attention(..., backend="cpu")`, forward
and backward) use `assert_close_relative`: the kernel's error against the float64 reference
is at most twice that of the reference backend run in the kernel's dtype (plus that dtype's
atol). lse -inf entries must match exactly. Output buffers are NaN-poisoned first.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
import torch
# Imported now, not by the first pyattn op inside a poison_empty test: dynamo records torch's
# functions when it is first imported, and would record the poisoned torch.empty_like.
import torch._dynamo  # noqa: F401

import pyattn
from pyattn import _extension
from pyattn.reference import attention as reference_attention
from pyattn.reference import dropout_keep_mask, dropout_threshold, philox_uint32
from pyattn.testing import assert_close, assert_close_relative

C = _extension.load_cpu()
pytestmark = pytest.mark.skipif(C is None, reason=f"{_extension.cpu_unavailable_reason()}")

from pyattn.launchers.cpu_softmax import softmax_forward  # noqa: E402

# B, Hq, Hkv, Sq, Sk, D, Dv
SHAPES = [
    (1, 2, 2, 1, 1, 16, 16),
    (2, 2, 2, 17, 17, 64, 64),
    (1, 4, 4, 97, 97, 80, 80),
    (1, 2, 2, 130, 130, 128, 128),
    (2, 8, 2, 17, 130, 64, 64),   # Sq < Sk, GQA 8/2 (short Sq: heads of a group share a block)
    (1, 4, 1, 130, 17, 16, 16),   # Sq > Sk, MQA: causal rows before Sq - Sk see nothing
    (1, 4, 2, 97, 61, 64, 80),    # Dv != D
    (1, 8, 1, 3, 200, 128, 48),   # decoding-like
    (1, 2, 1, 70, 450, 64, 64),   # several key blocks on every ISA (64, 96 or 192 keys a block)
]

# name: (causal, window, softcap)
MASKS = {
    "full": (False, (-1, -1), 0.0),
    "causal": (True, (-1, -1), 0.0),
    "win16-3": (False, (16, 3), 0.0),
    "causal-win5": (True, (5, -1), 0.0),
    "win0-0": (False, (0, 0), 0.0),
    "cap5": (False, (-1, -1), 5.0),
    "causal-cap30-win40": (True, (40, -1), 30.0),
}


def shape_id(shape) -> str:
    b, hq, hkv, sq, sk, d, dv = shape
    heads = f"H{hq}" if hq == hkv else f"H{hq}/{hkv}"
    dims = f"D{d}" if d == dv else f"D{d}-Dv{dv}"
    return f"B{b}-{heads}-Sq{sq}-Sk{sk}-{dims}"


def make_inputs(shape, layout: str, seed: int = 0):
    """q, k, v of `shape`; layout "bhsd" (contiguous) or "bshd" (a (B, S, H, D) buffer seen
    through .transpose(1, 2), as models produce it)."""
    b, hq, hkv, sq, sk, d, dv = shape
    gen = torch.Generator().manual_seed(seed)

    def rand(heads, seq, dim):
        if layout == "bshd":
            return torch.randn(b, seq, heads, dim, generator=gen).transpose(1, 2)
        return torch.randn(b, heads, seq, dim, generator=gen)

    return rand(hq, sq, d), rand(hkv, sk, d), rand(hkv, sk, dv)


def run_kernel(q, k, v, *, scale, causal=False, window=(-1, -1), softcap=0.0, out=None, lse=None):
    b, hq, sq, _ = q.shape
    if out is None:
        out = torch.full((b, hq, sq, v.shape[-1]), float("nan"))
    if lse is None:
        lse = torch.full((b, hq, sq), float("nan"))
    softmax_forward(q, k, v, out, lse, scale=scale, causal=causal, window_left=window[0],
                    window_right=window[1], softcap=softcap)
    return out, lse


def check(q, k, v, *, scale=None, causal=False, window=(-1, -1), softcap=0.0, **buffers):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = run_kernel(q, k, v, scale=scale, causal=causal, window=window, softcap=softcap, **buffers)
    ref_out, ref_lse = reference_attention(q.double(), k.double(), v.double(), causal=causal, scale=scale,
                                           window=window, softcap=softcap, return_lse=True)
    assert_close(out, ref_out, torch.float32, name="out", factor=0.5)
    assert_close(lse, ref_lse, torch.float32, name="lse", factor=0.5)
    return out, lse


@contextlib.contextmanager
def forced_isa(name: str):
    previous = C.set_isa(name)
    try:
        yield
    finally:
        C.set_isa(previous)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_reference(shape, mask, layout):
    causal, window, softcap = MASKS[mask]
    q, k, v = make_inputs(shape, layout)
    check(q, k, v, causal=causal, window=window, softcap=softcap)


@pytest.mark.parametrize("mask", ["full", "causal", "causal-cap30-win40"])
@pytest.mark.parametrize("isa", C.supported_isas() if C is not None else [])
def test_every_instruction_set(isa, mask):
    """Each compiled variant (AVX-512, AVX2, portable) this CPU can run, over several key blocks."""
    causal, window, softcap = MASKS[mask]
    with forced_isa(isa):
        assert C.current_isa() == isa
        # 193 keys: a last key block of one key (AVX2: 2 x 96 + 1), whose product takes the
        # one-row tiles, epilogue included
        for shape in [(1, 2, 2, 300, 450, 64, 64), (1, 2, 2, 64, 193, 64, 64), (2, 8, 2, 5, 150, 80, 40),
                      (1, 3, 3, 70, 9, 3, 5)]:
            check(*make_inputs(shape, "bshd"), causal=causal, window=window, softcap=softcap)


def test_scale_and_long_sequence_causal():
    """Several query and key blocks with the causal mask's skipped blocks, a non-default scale."""
    q, k, v = make_inputs((1, 2, 1, 257, 400, 64, 64), "bhsd", seed=3)
    check(q, k, v, scale=0.3, causal=True)
    check(q, k, v, scale=0.3, window=(70, 10))


@pytest.mark.parametrize("case", ["Sq0", "Sk0", "B0", "Sq0-Sk0"])
def test_empty(case):
    sq, sk, b = {"Sq0": (0, 9, 1), "Sk0": (7, 0, 1), "B0": (5, 5, 0), "Sq0-Sk0": (0, 0, 1)}[case]
    q, k, v = make_inputs((b, 4, 2, sq, sk, 16, 8), "bhsd")
    out, lse = run_kernel(q, k, v, scale=0.25)
    assert out.shape == (b, 4, sq, 8) and lse.shape == (b, 4, sq)
    # Empty in, empty out; with no keys at all every row is zeros with lse = -inf.
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, float("-inf")))


def test_rows_without_visible_keys():
    """Sq > Sk: under the causal mask, or a window (0, 0), rows before Sq - Sk see no key."""
    q, k, v = make_inputs((1, 2, 2, 40, 10, 16, 16), "bhsd")
    for mask in [dict(causal=True), dict(window=(0, 0))]:
        out, lse = check(q, k, v, **mask)
        assert torch.equal(out[:, :, :30], torch.zeros(1, 2, 30, 16))
        assert bool(torch.isneginf(lse[:, :, :30]).all()) and bool(torch.isfinite(lse[:, :, 30:]).all())


def test_broadcast_strides():
    """Stride-0 dims: k / v shared across the batch, q expanded over heads."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 1, 33, 64, generator=gen).expand(3, 4, 33, 64)
    k = torch.randn(1, 2, 50, 64, generator=gen).expand(3, 2, 50, 64)
    v = torch.randn(1, 2, 50, 32, generator=gen).expand(3, 2, 50, 32)
    assert q.stride(1) == 0 and k.stride(0) == 0
    check(q, k, v, causal=True)
    check(q, k, v, window=(8, 8))


def test_strided_outputs_and_inputs():
    """Outputs written through strides (a BSHD out buffer, an lse slice), inputs that are
    slices with non-unit innermost stride."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 45, 2 * 40, generator=gen)[..., ::2]           # stride(-1) == 2
    k = torch.randn(2, 3, 70, 40, generator=gen).transpose(2, 3).contiguous().transpose(2, 3)  # column-major
    v = torch.randn(2, 70, 3, 24, generator=gen).transpose(1, 2)
    out = torch.full((2, 45, 3, 24), float("nan")).transpose(1, 2)
    lse_buffer = torch.full((2, 3, 45, 2), float("nan"))
    out, lse = check(q, k, v, causal=True, out=out, lse=lse_buffer[..., 0])
    assert bool(torch.isnan(lse_buffer[..., 1]).all()), "wrote outside the lse view"


@pytest.mark.parametrize("isa", C.supported_isas() if C is not None else [])
def test_value_rows_any_layout(isa):
    """v read in place by whole vectors of its rows, or copied first: rows whose length is a
    whole number of vectors but that start unaligned (an offset view), an innermost stride of
    2, and row lengths that are not whole vectors."""
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 4, 90, 32, generator=gen) for _ in range(2))
    values = {
        "unaligned rows": torch.randn(1, 4, 90, 65, generator=gen)[..., 1:],
        "inner stride 2": torch.randn(1, 4, 90, 128, generator=gen)[..., ::2],
        "odd length": torch.randn(1, 4, 90, 19, generator=gen),
    }
    with forced_isa(isa):
        for name, v in values.items():
            check(q, k, v, causal=(name != "odd length"))


# B, Hq, Hkv, Sq, Sk, D, Dv: blocks of 1 to 4 query rows (decoding: the scores are dot products
# along D), key counts that leave a partial step, D whole vectors or not.
FEW_ROW_SHAPES = [
    (1, 1, 1, 1, 300, 64, 64),    # 1 row
    (2, 4, 2, 1, 150, 64, 32),    # GQA 4/2, Sq = 1: 2 rows
    (1, 8, 2, 1, 257, 64, 48),    # GQA 8/2: 4 rows
    (1, 3, 1, 1, 99, 20, 20),     # MQA 3/1: 3 rows (4 with a zero row), D not whole vectors
    (1, 2, 2, 2, 131, 32, 32),    # Sq = 2 without GQA: 2 rows
]


@pytest.mark.parametrize("mask", ["full", "causal-cap30-win40", "win16-3"])
@pytest.mark.parametrize("isa", C.supported_isas() if C is not None else [])
def test_few_query_rows(isa, mask):
    causal, window, softcap = MASKS[mask]
    gen = torch.Generator().manual_seed(5)
    with forced_isa(isa):
        for shape in FEW_ROW_SHAPES:
            for layout in ("bhsd", "bshd"):
                check(*make_inputs(shape, layout), causal=causal, window=window, softcap=softcap)
        q = torch.randn(1, 4, 1, 32, generator=gen)
        k = torch.randn(1, 2, 140, 64, generator=gen)[..., ::2]  # key rows with innermost stride 2
        check(q, k, torch.randn(1, 2, 140, 16, generator=gen), causal=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_few_query_rows_half_precision(dtype):
    """Decoding shapes in 16-bit inputs (key blocks widened into the float32 buffer), with gradients."""
    for shape in FEW_ROW_SHAPES[1:3]:
        check_against_reference(*rand_qkv(shape, dtype), causal=True)


def test_lse_none():
    q, k, v = make_inputs((1, 2, 2, 20, 20, 16, 16), "bhsd")
    out = torch.full((1, 2, 20, 16), float("nan"))
    softmax_forward(q, k, v, out, None, scale=0.25, causal=True, window_left=-1, window_right=-1,
                    softcap=0.0)
    assert_close(out, reference_attention(q.double(), k.double(), v.double(), causal=True, scale=0.25),
                 torch.float32, name="out", factor=0.5)


@contextlib.contextmanager
def parallel_backend(name: str):
    """"openmp": the OpenMP runtime torch loaded (the default here); "pool": pyattn's own."""
    C.use_own_pool_only(name == "pool")
    try:
        assert C.parallel_backend() == name
        yield
    finally:
        C.use_own_pool_only(False)


@pytest.mark.parametrize("backend", ["openmp", "pool"])
def test_thread_count_does_not_change_results(backend):
    """Blocks are independent, so any number of threads gives bit-identical results."""
    q, k, v = make_inputs((2, 4, 2, 150, 150, 64, 64), "bshd")
    previous = torch.get_num_threads()
    try:
        with parallel_backend(backend):
            torch.set_num_threads(1)
            out1, lse1 = run_kernel(q, k, v, scale=0.125, causal=True)
            torch.set_num_threads(max(2, previous))
            out2, lse2 = run_kernel(q, k, v, scale=0.125, causal=True)
            torch.set_num_threads(3)
            out3, lse3 = run_kernel(q, k, v, scale=0.125, causal=True)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    assert torch.equal(out1, out3) and torch.equal(lse1, lse3)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_runs_in_forked_child():
    """libgomp hangs in a forked child of a process that used it; the kernel switches to its
    own pool there. The child only runs our kernel (torch's own ops may hang there)."""
    q, k, v = make_inputs((1, 4, 4, 200, 200, 32, 32), "bhsd")
    expected, _ = run_kernel(q, k, v, scale=0.2)  # the parent uses its threads first
    out = torch.full_like(expected, float("nan"))
    lse = torch.full(expected.shape[:-1], float("nan"))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pid = os.fork()
        if pid == 0:  # child: exit code 0 iff the result matches
            ok = False
            try:
                softmax_forward(q, k, v, out, lse, scale=0.2, causal=False, window_left=-1, window_right=-1,
                                softcap=0.0)
                ok = C.parallel_backend() == "pool" and torch.equal(out, expected)
            finally:
                os._exit(0 if ok else 1)
    finally:
        torch.set_num_threads(previous)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the kernel hung in a forked child")
        time.sleep(0.05)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


# ------------------------------------------------------------------ public API, forward and backward

DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# B, Hq, Hkv, Sq, Sk, D, Dv: odd lengths, Sq < Sk and Sq > Sk, GQA / MQA, Dv != D
GRAD_SHAPES = [
    (1, 2, 2, 1, 1, 16, 16),
    (2, 2, 2, 37, 37, 64, 64),
    (1, 4, 2, 97, 130, 80, 80),   # GQA, several key blocks
    (1, 4, 1, 130, 37, 16, 16),   # MQA, Sq > Sk: causal rows before Sq - Sk see nothing
    (2, 6, 3, 97, 61, 64, 48),    # Dv != D
    (1, 8, 2, 3, 150, 64, 64),    # decoding-like
]
GRAD_MASKS = ["full", "causal", "win16-3", "cap5", "causal-cap30-win40"]


def rand_qkv(shape, dtype, *, layout="bhsd", seed=0, grad=True):
    q, k, v = make_inputs(shape, layout, seed)
    return [x.to(dtype).requires_grad_(grad) for x in (q, k, v)]


def as64(x):
    if x is None or not x.is_floating_point():
        return x
    return x.detach().double().requires_grad_(x.requires_grad)


def with_grads(out, lse, inputs, lse_grad=True):
    """[out, lse, gradients of `inputs` that require grad] for fixed random upstream gradients of out and lse."""
    gen = torch.Generator().manual_seed(123)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    loss = (out * dout).sum()
    if lse_grad:
        dlse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(lse.dtype)
        loss = loss + (torch.where(torch.isinf(lse), 0, lse) * dlse).sum()
    wrt = [x for x in inputs if x is not None and x.requires_grad]
    return [out, lse, *(torch.autograd.grad(loss, wrt) if wrt else ())]


def forward_backward(q, k, v, *, backend, attn_bias=None, seed=0, lse_grad=True, **kwargs):
    """out, lse and the gradients of q, k, v (and a float attn_bias)."""
    torch.manual_seed(seed)  # the dropout seed
    out, lse = pyattn.attention(q, k, v, attn_bias=attn_bias, return_lse=True, backend=backend, **kwargs)
    return with_grads(out, lse, (q, k, v, attn_bias), lse_grad)


NAMES = ["out", "lse", "dq", "dk", "dv", "dbias"]


def check_against_reference(q, k, v, attn_bias=None, **kwargs):
    """The cpu backend vs the float64 reference, error bounded by the reference run in the inputs' dtype."""
    ours = forward_backward(q, k, v, backend="cpu", attn_bias=attn_bias, **kwargs)
    ref64 = forward_backward(as64(q), as64(k), as64(v), backend="reference", attn_bias=as64(attn_bias), **kwargs)
    base = forward_backward(q, k, v, backend="reference", attn_bias=attn_bias, **kwargs)
    assert len(ours) == len(ref64) == len(base)
    for name, a, r, b in zip(NAMES, ours, ref64, base):
        assert a.dtype == b.dtype, name
        assert not torch.isnan(a).any(), f"{name} has NaN"
        assert_close_relative(a, r, b, name=name)
    return ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mask", GRAD_MASKS)
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=shape_id)
def test_backward_matches_reference(shape, mask, dtype, poison_empty):
    causal, window, softcap = MASKS[mask]
    q, k, v = rand_qkv(shape, dtype, layout="bshd")
    check_against_reference(q, k, v, causal=causal, window=window, softcap=softcap)


@pytest.mark.parametrize("mask", ["full", "causal", "cap5"])
def test_float16(mask, poison_empty):
    causal, window, softcap = MASKS[mask]
    q, k, v = rand_qkv((1, 4, 2, 97, 130, 64, 64), torch.float16)
    check_against_reference(q, k, v, causal=causal, window=window, softcap=softcap)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_half_conversions_exact(dtype):
    """With one key the output is v itself: every 16-bit pattern survives widening and rounding back
    (NaN stays NaN; -0 comes back as +0, the sum it goes through starts at +0). With two equal keys it
    is (v1 + v2) / 2, exact in float32: the rounding to 16 bits is to nearest even, as torch's."""
    patterns = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1, 1, 1, -1)
    zeros = torch.zeros(1, 1, 1, 4, dtype=dtype)
    out = torch.empty_like(patterns)
    softmax_forward(zeros, zeros, patterns, out, None, scale=1.0, causal=False, window_left=-1, window_right=-1,
                    softcap=0.0)
    nan = torch.isnan(patterns)
    assert bool(torch.isnan(out[nan]).all())
    assert torch.equal(out[~nan], patterns[~nan])  # compares values: -0 == +0
    gen = torch.Generator().manual_seed(15)
    v = torch.randint(-32768, 32768, (1, 1, 2, 50000), generator=gen, dtype=torch.int32).to(torch.int16).view(dtype)
    v = torch.where(torch.isfinite(v), v, torch.zeros((), dtype=dtype))
    out = torch.empty(1, 1, 1, 50000, dtype=dtype)
    softmax_forward(zeros, torch.zeros(1, 1, 2, 4, dtype=dtype), v, out, None, scale=1.0, causal=False,
                    window_left=-1, window_right=-1, softcap=0.0)
    assert torch.equal(out[0, 0, 0], ((v[0, 0, 0].float() + v[0, 0, 1].float()) * 0.5).to(dtype))


# Scores (in natural units) of key j along one direction, which the queries alternately see
# as they are and negated: the running maximum of a row rises block after block, jumps once,
# or sits far below zero. The forward fuses the softmax of unmasked key blocks into
# S^T = K . QT against the running maximum so far, moves it only where a block's maximum
# exceeds it by more than 8 (log2 units), and redoes a block unfused where P^T could have
# overflowed or underflowed (beyond 100): each profile takes one of these paths. Scores this
# large lose digits to float32 rounding, so the error bound is the float32 reference's.
# Forward only: the backward's P = exp(S - lse) carries lse's float32 rounding (relative
# ~1e-5 at |lse| ~ 100), which the keys' shared large component turns into dq errors of 2-3x
# a plain float32 softmax's (as in every kernel that saves only lse).
SCORE_PROFILES = {
    "rising": lambda j: 0.25 * j,
    "jump": lambda j: 100.0 * (j >= 300),
    "far-below": lambda j: -90.0 + 0.0 * j,
}


@pytest.mark.parametrize("profile", list(SCORE_PROFILES))
@pytest.mark.parametrize("isa", C.supported_isas() if C is not None else [])
def test_running_max_moves(isa, profile):
    q, k, v = make_inputs((1, 2, 1, 60, 450, 64, 64), "bhsd", seed=4)
    q, k = 0.05 * q, 0.05 * k
    q[..., 0] = torch.tensor([1.0, -1.0]).repeat(30)
    k[..., 0] = SCORE_PROFILES[profile](torch.arange(450, dtype=torch.float32))
    with forced_isa(isa):
        check_against_reference(q, k, v, scale=1.0)
        check_against_reference(q, k, v, scale=1.0, causal=True)


@pytest.mark.parametrize("isa", C.supported_isas() if C is not None else [])
def test_backward_keys_with_shared_component(isa):
    """Keys sharing a large component (as in models without QK-norm): dQ = scale * dS K cancels
    it only if sum_j dS_ij = 0, i.e. if the backward's scores are the forward's to the bit."""
    q, k, v = make_inputs((1, 4, 4, 128, 512, 64, 64), "bhsd", seed=5)
    u = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(6)), dim=0)
    q, k, v = (x.requires_grad_() for x in (3.0 * q, k + 30.0 * u, v))
    with forced_isa(isa):
        ours = forward_backward(q, k, v, backend="cpu")
    ref64 = forward_backward(as64(q), as64(k), as64(v), backend="reference")
    base = forward_backward(q, k, v, backend="reference")
    for name, a, r, b in zip(NAMES, ours, ref64, base):
        # no absolute floor: these errors sit well under float32's atol (dq's was 3.6x the
        # baseline's with K scaled in the backward, 1.3x with Q scaled as in the forward)
        assert_close_relative(a, r, b, name=name, floor=0.0)


def test_backward_long_causal_and_scale():
    """Many key blocks and query tiles: the skipped, partial and full blocks of a causal mask."""
    q, k, v = rand_qkv((1, 2, 1, 257, 400, 64, 64), torch.float32, seed=3)
    check_against_reference(q, k, v, causal=True, scale=0.3)
    check_against_reference(q, k, v, window=(70, 10), scale=0.3)


def test_backward_some_inputs_without_grad():
    """Only k requires grad; and with return_lse=False the lse gradient is zero."""
    q, k, v = rand_qkv((1, 2, 2, 40, 50, 32, 32), torch.float32)
    q.requires_grad_(False)
    v.requires_grad_(False)
    check_against_reference(q, k, v, causal=True, lse_grad=False)


# attn_bias shapes, broadcast to (B=2, Hq=4, Sq=37, Sk=70)
BIAS_SHAPES = {"full": (2, 4, 37, 70), "2d": (37, 70), "heads-keys": (1, 4, 1, 70), "batch-queries": (2, 1, 37, 1),
               "keys": (70,)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mask", ["full", "causal", "causal-cap30-win40"])
@pytest.mark.parametrize("bias_shape", list(BIAS_SHAPES))
def test_float_bias_with_grad(bias_shape, mask, dtype, poison_empty):
    causal, window, softcap = MASKS[mask]
    q, k, v = rand_qkv((2, 4, 2, 37, 70, 64, 64), dtype)
    gen = torch.Generator().manual_seed(5)
    bias = (2 * torch.randn(BIAS_SHAPES[bias_shape], generator=gen)).to(dtype).requires_grad_()
    check_against_reference(q, k, v, attn_bias=bias, causal=causal, window=window, softcap=softcap)


def test_expanded_bias_stride0():
    """A bias expanded to the full shape (stride 0 on its broadcast dims), -inf entries, no grad."""
    q, k, v = rand_qkv((2, 4, 4, 33, 65, 16, 16), torch.float32)
    gen = torch.Generator().manual_seed(6)
    bias = torch.randn(1, 4, 1, 65, generator=gen)
    bias[..., :3] = float("-inf")
    bias = bias.expand(2, 4, 33, 65)
    assert bias.stride(0) == 0 and bias.stride(2) == 0
    check_against_reference(q, k, v, attn_bias=bias)
    check_against_reference(*[x.to(torch.bfloat16).detach().requires_grad_() for x in (q, k, v)],
                            attn_bias=bias.to(torch.bfloat16), causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_bool_mask_and_fully_masked_rows(dtype, poison_empty):
    """True = keep; rows the mask hides entirely output zeros, lse -inf, zero gradients (no NaN)."""
    q, k, v = rand_qkv((2, 4, 2, 45, 80, 32, 32), dtype)
    gen = torch.Generator().manual_seed(7)
    keep = torch.rand(2, 1, 45, 80, generator=gen) > 0.4
    keep[:, :, 5:9] = False
    out, lse, dq, dk, dv = check_against_reference(q, k, v, attn_bias=keep, causal=True)
    assert torch.equal(out[:, :, 5:9], torch.zeros_like(out[:, :, 5:9]))
    assert bool(torch.isneginf(lse[:, :, 5:9]).all())
    assert torch.equal(dq[:, :, 5:9], torch.zeros_like(dq[:, :, 5:9]))


def test_rows_without_keys_have_zero_grads(poison_empty):
    """Sq > Sk with the causal mask and a (0, 0) window: rows before Sq - Sk see nothing."""
    q, k, v = rand_qkv((1, 2, 2, 40, 10, 16, 16), torch.float32)
    for mask in [dict(causal=True), dict(window=(0, 0))]:
        out, lse, dq, dk, dv = check_against_reference(q, k, v, **mask)
        assert torch.equal(dq[:, :, :30], torch.zeros(1, 2, 30, 16))
        assert bool(torch.isneginf(lse[:, :, :30]).all())


@pytest.mark.parametrize("case", ["Sq0", "Sk0", "B0", "Sq0-Sk0"])
def test_empty_backward(case, poison_empty):
    sq, sk, b = {"Sq0": (0, 9, 1), "Sk0": (7, 0, 1), "B0": (5, 5, 0), "Sq0-Sk0": (0, 0, 1)}[case]
    q, k, v = rand_qkv((b, 4, 2, sq, sk, 16, 8), torch.float32)
    out, lse, dq, dk, dv = forward_backward(q, k, v, backend="cpu", causal=True)
    assert out.shape == (b, 4, sq, 8) and lse.shape == (b, 4, sq)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for x in (out, dq, dk, dv):
        assert torch.equal(x, torch.zeros_like(x))
    assert bool(torch.isneginf(lse).all())


def test_noncontiguous_and_broadcast_inputs(poison_empty):
    """(B, S, H, D) buffers seen through .transpose(1, 2), k / v expanded over the batch (stride 0),
    a non-contiguous upstream gradient."""
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(2, 50, 4, 32, generator=gen).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 2, 70, 32, generator=gen).expand(2, 2, 70, 32).requires_grad_()
    v = torch.randn(1, 70, 2, 24, generator=gen).transpose(1, 2).expand(2, 2, 70, 24).requires_grad_()
    assert k.stride(0) == 0 and not q.is_contiguous()
    check_against_reference(q, k, v, causal=True)
    out = pyattn.attention(q, k, v, backend="cpu")
    dout = torch.randn(2, 24, 50, 4, generator=gen).permute(0, 3, 2, 1)
    ours = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (as64(x) for x in (q, k, v))
    ref = torch.autograd.grad(pyattn.attention(q64, k64, v64, backend="reference"), (q64, k64, v64), dout.double())
    for name, a, r in zip(["dq", "dk", "dv"], ours, ref):
        assert_close(a, r, torch.float32, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_decoding_splits_keys(dtype, poison_empty):
    """Fewer query blocks than threads: the forward splits the keys and merges the parts by their lse
    (ranges with no visible key, under a window, included)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for shape, mask in [((1, 8, 1, 1, 2100, 64, 64), "full"), ((1, 8, 2, 3, 1500, 64, 48), "causal"),
                            ((1, 2, 2, 1, 700, 16, 16), "win16-3")]:
            causal, window, softcap = MASKS[mask]
            q, k, v = rand_qkv(shape, dtype)
            gen = torch.Generator().manual_seed(14)
            bias = torch.randn(shape[3], shape[4], generator=gen).to(dtype)
            check_against_reference(q, k, v, causal=causal, window=window, softcap=softcap)
            check_against_reference(q, k, v, attn_bias=bias, dropout_p=0.3, causal=causal, window=window)
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------ dropout


def kernel_keep_mask(seed, p, b, h, sq, sk):
    """The kernel's keep mask: with v the identity, out[.., i, j] = P_ij * keep / (1 - p) and P_ij > 0."""
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(b, h, sq, 16, generator=gen) * 0.1
    k = torch.randn(b, h, sk, 16, generator=gen) * 0.1
    v = torch.eye(sk).expand(b, h, sk, sk)
    out = torch.full((b, h, sq, sk), float("nan"))
    softmax_forward(q, k, v, out, None, scale=0.25, causal=False, window_left=-1, window_right=-1, softcap=0.0,
                    dropout_p=p, dropout_seed=seed)
    assert not torch.isnan(out).any()
    return out != 0


@pytest.mark.parametrize("seed", [0, 12345, 2**62 + 977, -5])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_is_the_reference_mask(seed, p):
    expected = dropout_keep_mask(seed & (2**64 - 1), (2, 3, 37, 70), p, "cpu")
    assert torch.equal(kernel_keep_mask(seed, p, 2, 3, 37, 70), expected)


def test_philox_known_answer():
    assert int(philox_uint32(0, torch.tensor([0]))) == 0x6627E8D5
    assert torch.equal(kernel_keep_mask(0, 0.5, 1, 1, 1, 1), dropout_keep_mask(0, (1, 1, 1, 1), 0.5, "cpu"))


def test_dropout_counters_past_32_bits():
    """Counters (offset) above 2**32: a (0, 0) window over Sq = Sk = 70000 makes query i see key i only,
    with offset i * Sk + i up to 4.9e9, so out[i] = keep / (1 - p) exactly."""
    n, p, seed = 70000, 0.5, 2**40 + 3
    gen = torch.Generator().manual_seed(10)
    q, k = torch.randn(1, 1, n, 16, generator=gen), torch.randn(1, 1, n, 16, generator=gen)
    v = torch.ones(1, 1, n, 1)
    out = torch.full((1, 1, n, 1), float("nan"))
    softmax_forward(q, k, v, out, None, scale=0.25, causal=False, window_left=0, window_right=0, softcap=0.0,
                    dropout_p=p, dropout_seed=seed)
    i = torch.arange(n, dtype=torch.int64)
    keep = (philox_uint32(seed, i * n + i) >> 8) >= dropout_threshold(p)
    assert torch.equal(out.flatten() != 0, keep)
    assert bool((out.flatten()[keep] == 2.0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mask", ["full", "causal-cap30-win40"])
def test_dropout_matches_reference(mask, dtype, poison_empty):
    """Same torch seed -> same Philox seed -> the reference's mask exactly (else errors would be O(1))."""
    causal, window, softcap = MASKS[mask]
    q, k, v = rand_qkv((2, 2, 1, 37, 70, 64, 64), dtype)
    gen = torch.Generator().manual_seed(11)
    bias = torch.randn(1, 2, 37, 70, generator=gen).to(dtype).requires_grad_()
    check_against_reference(q, k, v, attn_bias=bias, causal=causal, window=window, softcap=softcap,
                            dropout_p=0.3, seed=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_short_queries_gqa_with_bias_and_dropout(dtype, poison_empty):
    """Sq = 3 with 8 query heads per kv head: the forward puts the heads of a group into one block,
    so bias rows and dropout counters come from (head, query) pairs."""
    q, k, v = rand_qkv((2, 8, 1, 3, 150, 64, 32), dtype)
    gen = torch.Generator().manual_seed(13)
    bias = torch.randn(2, 8, 3, 150, generator=gen).to(dtype).requires_grad_()
    check_against_reference(q, k, v, attn_bias=bias, dropout_p=0.4, causal=True, seed=6)


def test_dropout_follows_torch_manual_seed():
    q, k, v = rand_qkv((1, 2, 2, 30, 40, 16, 16), torch.float32, grad=False)
    run = lambda: pyattn.attention(q, k, v, dropout_p=0.5, backend="cpu")  # noqa: E731
    torch.manual_seed(0)
    a, b = run(), run()
    torch.manual_seed(0)
    c = run()
    assert torch.equal(a, c) and not torch.equal(a, b)


# ------------------------------------------------------------------ varlen

def varlen_inputs(lens_q, lens_k, hq, hkv, d, dv, dtype, seed=0):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(int(cu_q[-1]), hq, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(int(cu_k[-1]), hkv, d, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(int(cu_k[-1]), hkv, dv, generator=gen).to(dtype).requires_grad_()
    return q, k, v, cu_q, cu_k


def varlen_forward_backward(q, k, v, cu_q, cu_k, max_q, max_k, *, backend, **kwargs):
    torch.manual_seed(2)
    out, lse = pyattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True, backend=backend,
                                       **kwargs)
    return with_grads(out, lse, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mask", ["full", "causal", "win16-3", "causal-cap30-win40", "dropout"])
def test_varlen_matches_reference(mask, dtype, poison_empty):
    """Empty sequences on either side, lengths across block edges, GQA; masks align per sequence."""
    lens_q, lens_k = [5, 0, 70, 130, 1, 0], [9, 3, 0, 100, 64, 0]
    q, k, v, cu_q, cu_k = varlen_inputs(lens_q, lens_k, 4, 2, 64, 48, dtype)
    causal, window, softcap = MASKS.get(mask, MASKS["full"])
    kwargs = dict(causal=causal, window=window, softcap=softcap, dropout_p=0.25 if mask == "dropout" else 0.0)
    args = (cu_q, cu_k, max(lens_q), max(lens_k))
    ours = varlen_forward_backward(q, k, v, *args, backend="cpu", **kwargs)
    ref64 = varlen_forward_backward(as64(q), as64(k), as64(v), *args, backend="reference", **kwargs)
    base = varlen_forward_backward(q, k, v, *args, backend="reference", **kwargs)
    for name, a, r, b in zip(NAMES, ours, ref64, base):
        assert_close_relative(a, r, b, name=name)


def test_varlen_strided_inputs(poison_empty):
    """Packed tensors that are views: q a slice of a wider buffer, k / v from one (total, 2, H, D) buffer."""
    lens = [17, 64, 3]
    cu = torch.tensor([0, 17, 81, 84], dtype=torch.int32)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(84, 4, 2 * 32, generator=gen)[..., :32].requires_grad_()
    kv = torch.randn(84, 2, 2, 32, generator=gen)
    k, v = kv[:, 0].requires_grad_(), kv[:, 1].requires_grad_()
    ours = varlen_forward_backward(q, k, v, cu, cu, max(lens), max(lens), backend="cpu", causal=True)
    ref = varlen_forward_backward(as64(q), as64(k), as64(v), cu, cu, max(lens), max(lens), backend="reference",
                                  causal=True)
    for name, a, r in zip(NAMES, ours, ref):
        assert_close(a, r, torch.float32, name=name)


# ------------------------------------------------------------------ instruction sets and threads

@pytest.mark.parametrize("isa", C.supported_isas() if C is not None else [])
def test_every_instruction_set_backward_and_features(isa):
    """Each compiled variant: backward, bf16, bias, dropout, varlen."""
    with forced_isa(isa):
        q, k, v = rand_qkv((2, 4, 2, 70, 150, 80, 48), torch.float32, layout="bshd")
        check_against_reference(q, k, v, causal=True, softcap=5.0)
        gen = torch.Generator().manual_seed(12)
        bias = torch.randn(1, 4, 70, 1, generator=gen).requires_grad_()
        check_against_reference(q, k, v, attn_bias=bias, dropout_p=0.2, window=(40, 40))
        qb, kb, vb = rand_qkv((1, 4, 4, 70, 150, 64, 64), torch.bfloat16, layout="bshd")
        check_against_reference(qb, kb, vb, causal=True, attn_bias=torch.rand(70, 150, generator=gen) > 0.2)
        assert torch.equal(kernel_keep_mask(7, 0.3, 1, 2, 33, 41), dropout_keep_mask(7, (1, 2, 33, 41), 0.3, "cpu"))
        lens = [20, 0, 90]
        q, k, v, cu_q, cu_k = varlen_inputs(lens, lens[::-1], 2, 1, 16, 16, torch.float32)
        args = (cu_q, cu_k, 90, 90)
        ours = varlen_forward_backward(q, k, v, *args, backend="cpu", causal=True)
        ref = varlen_forward_backward(as64(q), as64(k), as64(v), *args, backend="reference", causal=True)
        for name, a, r in zip(NAMES, ours, ref):
            assert_close(a, r, torch.float32, name=name)


@pytest.mark.parametrize("backend", ["openmp", "pool"])
def test_thread_count_backward(backend):
    """The backward on 1, 2 and 3 threads: dk, dv are bit-identical (each block owns its rows), dq sums
    per-worker parts and may differ in the last bits."""
    q, k, v = rand_qkv((2, 4, 2, 150, 150, 64, 64), torch.float32, layout="bshd")
    previous = torch.get_num_threads()
    results = []
    try:
        with parallel_backend(backend):
            for n in (1, max(2, previous), 3):
                torch.set_num_threads(n)
                results.append(forward_backward(q, k, v, backend="cpu", causal=True))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for name, a, b in zip(NAMES, results[0], other):
            if name == "dq":
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
            else:
                assert torch.equal(a, b), name


def test_backend_choice_and_reasons(no_default_backend):
    """backend=None picks the kernels for float32 / bfloat16 / float16 training with every feature; float64
    goes to the reference with the reason."""
    q, k, v = rand_qkv((1, 2, 2, 5, 5, 8, 8), torch.bfloat16)
    bias = torch.zeros(5, 5, dtype=torch.bfloat16, requires_grad=True)
    plan = pyattn.explain(pyattn.attention, q, k, v, causal=True, attn_bias=bias, dropout_p=0.1, softcap=2.0)
    assert plan.backend == "cpu" and "forward+backward" in plan.kernel
    q64, k64, v64 = rand_qkv((1, 2, 2, 5, 5, 8, 8), torch.float64)
    plan = pyattn.explain(pyattn.attention, q64, k64, v64)
    assert plan.backend == "reference" and "float64" in dict(plan.passed_over)["cpu"]
    packed = [x[0].transpose(0, 1) for x in (q, k, v)]
    cu = torch.tensor([0, 5], dtype=torch.int32)
    assert pyattn.explain("attention_varlen", *packed, cu, cu, 5, 5).backend == "cpu"
