"""The CUDA C++ kernels (`pyattn._cuda`) on a GPU, forward and backward, against the float64 reference:
the same correctness grids as the Triton kernels' (`attention_checks.check_attention`: the relative rule
of `pyattn.testing.assert_close_relative`, factor 2 over plain PyTorch in the inputs' dtype), plus a
compute-sanitizer memcheck over one small case of each kernel family.

Every test records which kernel families it exercised (`cuda_kernels`); `python -m pytest -m gpu
--record-cuda-verification` then writes `pyattn/dispatch/cuda_verified.json`, which `backend=None`
consults. Skipped without a GPU (run `python -m pytest -m gpu`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import pyattn
from pyattn import reference as ref
from pyattn.dispatch import cuda_registry
from pyattn.testing import assert_close_relative

from attention_checks import DTYPE_IDS, LINEAR_REL_FLOOR, check_attention, linear_run, make_qkv

pytestmark = pytest.mark.gpu


def families(plan) -> tuple:
    """The kernel families a pyattn.explain plan names."""
    return tuple(name for name in cuda_registry.KERNELS if name in plan.kernel)


def run_attention(cuda_kernels, q, k, v, **kw):
    cuda_kernels(*families(pyattn.explain(pyattn.attention, q, k, v, backend="cuda", **kw)))
    return check_attention(q, k, v, backend="cuda", **kw)


# --------------------------------------------------------------------------- softmax: tensor cores

# B, Hq, Hkv, Sq, Sk, D, Dv, layout, kwargs: every feature, GQA and MQA, odd lengths, each head-dim bucket
# (64, 128, 256) with dims that fill it and dims that do not (80, 96, 200), Sq < Sk and Sq > Sk.
SOFTMAX_CASES = {
    "plain-D64": (2, 4, 4, 256, 256, 64, 64, "bhsd", {}),
    "causal-D128-gqa": (1, 8, 2, 1000, 1000, 128, 128, "bshd", dict(causal=True)),
    "causal-Sq<Sk": (2, 4, 2, 97, 1030, 64, 64, "bshd", dict(causal=True)),
    "causal-Sq>Sk": (1, 4, 4, 300, 130, 64, 64, "bhsd", dict(causal=True)),  # early rows see no key
    "window-D80": (1, 4, 1, 513, 513, 80, 80, "bshd", dict(window=(100, 20))),
    "causal-window-D96-mqa": (2, 6, 1, 777, 777, 96, 96, "bhsd", dict(causal=True, window=(256, -1))),
    "softcap-D128": (1, 4, 2, 333, 555, 128, 128, "bshd", dict(softcap=20.0, scale=0.3)),
    "D256": (1, 2, 2, 257, 257, 256, 256, "bhsd", dict(causal=True)),
    "D200-Dv64": (1, 4, 2, 130, 200, 200, 64, "bshd", {}),
    "D64-Dv128": (1, 2, 1, 129, 71, 64, 128, "bhsd", dict(causal=True)),
    "seq17": (3, 2, 2, 17, 17, 64, 64, "bhsd", dict(causal=True)),
    "long-D128": (1, 16, 2, 4096, 4096, 128, 128, "bshd", dict(causal=True)),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", list(SOFTMAX_CASES))
def test_softmax_forward_backward(name, dtype, cuda_kernels):
    b, hq, hkv, sq, sk, d, dv, layout, kw = SOFTMAX_CASES[name]
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dv, dtype, layout=layout, device="cuda")
    run_attention(cuda_kernels, q, k, v, **kw)


@pytest.mark.parametrize("name", ["plain-D64", "causal-Sq>Sk", "window-D80", "softcap-D128", "D200-Dv64"])
def test_softmax_float32_forward(name, cuda_kernels):
    """float32 runs the scalar forward (no float32 backward on CUDA)."""
    b, hq, hkv, sq, sk, d, dv, layout, kw = SOFTMAX_CASES[name]
    q, k, v = (x.detach() for x in make_qkv(b, hq, hkv, sq, sk, d, dv, torch.float32, layout=layout, device="cuda"))
    run_attention(cuda_kernels, q, k, v, **kw)


# --------------------------------------------------------------------------- softmax: decoding

# B, Hq, Hkv, Sq (<= 16: split-KV decoding), Sk, D, kwargs
DECODE_CASES = {
    "one-query": (4, 32, 8, 1, 8192, 128, dict(causal=True)),
    "mqa-long": (1, 16, 1, 1, 262144, 128, {}),
    "four-queries-gqa": (2, 8, 2, 4, 4099, 64, dict(causal=True)),
    "sixteen-window-softcap": (1, 8, 4, 16, 10000, 96, dict(causal=True, window=(1024, 0), softcap=30.0)),
    "few-keys": (3, 4, 4, 2, 5, 64, dict(causal=True)),
    "one-key": (2, 4, 2, 1, 1, 256, {}),
    "wide-D256": (1, 8, 1, 3, 3000, 256, dict(causal=True)),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode(name, dtype, cuda_kernels):
    """Few queries over many keys: split-KV forward (and, for 16-bit inputs, the tensor-core backward)."""
    b, hq, hkv, sq, sk, d, kw = DECODE_CASES[name]
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, d, dtype, layout="bshd", device="cuda")
    if dtype == torch.float32 or sk > 100000:
        q, k, v = q.detach(), k.detach(), v.detach()
    run_attention(cuda_kernels, q, k, v, **kw)


@pytest.mark.parametrize("sq,sk", [(0, 9), (7, 0), (0, 0), (1, 0)], ids=["Sq0", "Sk0", "Sq0-Sk0", "decode-Sk0"])
def test_empty_sequences(sq, sk, cuda_kernels):
    q, k, v = make_qkv(2, 4, 2, sq, sk, 64, 64, torch.bfloat16, device="cuda")
    run_attention(cuda_kernels, q, k, v, causal=True)


# --------------------------------------------------------------------------- linear attention

# B, Hq, Hkv, S, F, Dv, log decay, normalize, initial state
LINEAR_CASES = {
    "plain": (2, 4, 4, 1000, 64, 64, "none", True, False),
    "gqa-token-decay-state": (1, 8, 2, 4097, 128, 128, "token", True, True),
    "head-decay-unnormalized": (2, 4, 4, 777, 64, 64, "head", False, True),
    "F32-Dv80": (1, 4, 2, 300, 32, 80, "none", True, True),
    "odd-F48-Dv1": (1, 2, 1, 65, 48, 1, "token", True, False),
    "decode-steps": (2, 4, 2, 16, 64, 64, "token", True, True),  # <= 16 tokens: the recurrent kernel
    "one-token": (3, 2, 2, 1, 128, 128, "none", True, True),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("feature_map", ["elu", "relu", "identity"])
@pytest.mark.parametrize("name", list(LINEAR_CASES))
def test_linear_attention(name, feature_map, dtype, cuda_kernels):
    b, hq, hkv, s, f, dv, decay, normalize, with_state = LINEAR_CASES[name]
    if feature_map == "identity" and normalize:
        normalize = False  # identity features can make the denominator vanish
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(b, s, h, f, device="cuda", dtype=dtype, generator=gen).transpose(1, 2).requires_grad_()
            for h in (hq, hkv))
    v = torch.randn(b, s, hkv, dv, device="cuda", dtype=dtype, generator=gen).transpose(1, 2).requires_grad_()
    g = {"none": None, "head": -0.05 * torch.rand(hq, device="cuda", generator=gen),
         "token": -0.1 * torch.rand(b, hq, s, device="cuda", generator=gen)}[decay]
    g = None if g is None else g.requires_grad_()
    state = None
    if with_state:
        state = (torch.randn(b, hq, f, dv, device="cuda", generator=gen).requires_grad_(),
                 (1 + torch.rand(b, hq, f, device="cuda", generator=gen)).requires_grad_())
    grads = [torch.randn(shape, device="cuda", dtype=torch.float64, generator=gen)
             for shape in ((b, hq, s, dv), (b, hq, f, dv), (b, hq, f))]
    kw = dict(feature_map=feature_map, normalize=normalize, scale=f ** -0.5)
    cuda_kernels(*families(pyattn.explain(pyattn.linear_attention, q, k, v, log_decay=g, initial_state=state,
                                          backend="cuda", **kw)))
    got = linear_run(pyattn.linear_attention, q, k, v, g, state, grads, backend="cuda", **kw)
    torch.cuda.synchronize()
    doubles = [None if x is None else x.detach().double().requires_grad_() for x in (q, k, v, g, *(state or ()))]
    state64 = tuple(doubles[4:]) if state else None
    want = linear_run(ref.linear_attention, *doubles[:4], state64, grads, **kw)
    base = linear_run(ref.linear_attention, q, k, v, g, state, grads, **kw)  # the same inputs, upcast
    names = ["out", "S", "z", "dq", "dk", "dv"] + (["dlog_decay"] if g is not None else []) + \
        (["dS0", "dz0"] if state else [])
    for name, a, e, bl in zip(names, got, want, base):
        floor = LINEAR_REL_FLOOR[dtype] * max(e.abs().max().item(), 1e-30)
        assert_close_relative(a, e, bl, name=name, factor=2.0, floor=floor)


def test_linear_prefix_then_decoding_steps(cuda_kernels):
    """A 4000-token prefix (chunked) then 16 one-token steps (recurrent, state passed along) equal the
    whole sequence run at once."""
    b, hq, hkv, s, d = 2, 8, 2, 4016, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (hq, hkv, hkv))
    g = -0.05 * torch.rand(b, hq, s, device="cuda", generator=gen)
    cuda_kernels("linear_chunk_fwd", "linear_recurrent_fwd")
    run = lambda t0, t1, state=None: pyattn.linear_attention(  # noqa: E731
        q[:, :, t0:t1], k[:, :, t0:t1], v[:, :, t0:t1], log_decay=g[:, :, t0:t1], initial_state=state,
        output_final_state=True, backend="cuda")
    whole, (s_whole, z_whole) = run(0, s)
    out, state = run(0, 4000)
    outs = [out]
    for t in range(4000, s):
        out, state = run(t, t + 1, state)
        outs.append(out)
    tol = dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(torch.cat(outs, 2), whole, **tol)
    torch.testing.assert_close(state[0], s_whole, **tol)
    torch.testing.assert_close(state[1], z_whole, **tol)


# --------------------------------------------------------------------------- compute-sanitizer

# One small case per kernel family, run in a child process under memcheck.
SANITIZER_SCRIPT = textwrap.dedent("""
    import torch, pyattn
    g = torch.Generator(device="cuda").manual_seed(0)
    def r(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=g).requires_grad_(dtype != torch.float32)
    q, k, v = r(2, 4, 97, 80), r(2, 2, 130, 80), r(2, 2, 130, 80)
    out = pyattn.attention(q, k, v, causal=True, window=(50, 3), backend="cuda")   # softmax_fwd_mma
    out.sum().backward()                                                             # softmax_bwd_mma
    q32, k32, v32 = (r(1, 2, s, 72, dtype=torch.float32) for s in (33, 40, 40))
    pyattn.attention(q32, k32, v32, softcap=5.0, backend="cuda")                    # softmax_fwd_simt
    qd = r(2, 8, 3, 128)
    pyattn.attention(qd, r(2, 2, 3000, 128), r(2, 2, 3000, 128), causal=True, backend="cuda")  # softmax_decode
    ql, kl, vl = r(1, 4, 200, 48), r(1, 2, 200, 48), r(1, 2, 200, 40)
    gl = (-0.1 * torch.rand(1, 4, 200, device="cuda", generator=g)).requires_grad_()
    out, (s, z) = pyattn.linear_attention(ql, kl, vl, log_decay=gl, output_final_state=True, backend="cuda")
    (out.float().sum() + s.sum() + z.sum()).backward()                              # linear_chunk_fwd / _bwd
    pyattn.linear_attention(ql[:, :, :1], kl[:, :, :1], vl[:, :, :1], initial_state=(s.detach(), z.detach()),
                            backend="cuda")                                          # linear_recurrent_fwd
    torch.cuda.synchronize()
    print("done")
""")


def test_compute_sanitizer_memcheck(cuda_kernels, tmp_path):
    tool = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    if tool is None:
        pytest.skip("compute-sanitizer is not installed")
    script = tmp_path / "kernels.py"
    script.write_text(SANITIZER_SCRIPT)
    result = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, str(script)],
                            capture_output=True, text=True, timeout=1200)
    summary = [line for line in result.stdout.splitlines() if "ERROR SUMMARY" in line]
    assert result.returncode == 0 and "done" in result.stdout, result.stdout[-4000:] + result.stderr[-4000:]
    assert summary and "0 errors" in summary[-1], summary
    cuda_kernels(*cuda_registry.KERNELS, sanitizer=True)
