"""The C++ CPU softmax attention forward (pyattn._C through its launcher) against the
float64 reference, `pyattn.reference.attention`.

Tolerance: `pyattn.testing.assert_close` with float32's rule at factor 0.5, i.e.
atol 1e-5, rtol 1e-4 against float64 (the kernel accumulates in float32; its errors
measure ~1e-6 on these sizes). lse is checked the same way, and its -inf entries
(rows that see no key) must match exactly. Output buffers are NaN-poisoned first.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
import torch

from pyattn import _extension
from pyattn.reference import attention as reference_attention
from pyattn.testing import assert_close

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
        for shape in [(1, 2, 2, 300, 300, 64, 64), (2, 8, 2, 5, 150, 80, 40), (1, 3, 3, 70, 9, 3, 5)]:
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
