"""On a CUDA device: every op's reference backend on CUDA tensors, and the Triton linear attention
kernels (the CUDA C++ kernels: tests/test_cuda_kernels.py). Run with `python -m pytest -m gpu`;
skipped without a GPU.

Tolerance: the relative rule of `pyattn.testing.assert_close_relative`: the kernel's error
against float64 is at most twice the rounding error of the float64 result cast to the kernel's
dtype, plus that dtype's atol.
"""
import pytest
import torch

import pyattn
from pyattn import reference as ref
from pyattn.testing import assert_close_relative

from attention_checks import LINEAR_REL_FLOOR, linear_run

pytestmark = pytest.mark.gpu

def inputs(shape, dtype, layout="bhsd"):
    b, hq, hkv, sq, sk, d, dv = shape
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(h, s, dim):
        if layout == "bshd":
            return torch.randn(b, s, h, dim, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
        return torch.randn(b, h, s, dim, device="cuda", dtype=dtype, generator=gen)

    return rand(hq, sq, d), rand(hkv, sk, d), rand(hkv, sk, dv)


@pytest.mark.parametrize("op", ["attention-bwd", "varlen", "linear", "block-sparse", "topk", "cross"])
def test_reference_backend_runs_on_cuda_tensors(op):
    q, k, v = (x.requires_grad_() for x in inputs((2, 4, 2, 33, 33, 16, 16), torch.float32))
    if op == "attention-bwd":
        out = pyattn.attention(q, k, v, causal=True, backend="reference")
    elif op == "varlen":
        cu = torch.tensor([0, 10, 33], dtype=torch.int32, device="cuda")
        out = pyattn.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                                      23, 23, causal=True, backend="reference")
    elif op == "linear":
        out = pyattn.linear_attention(q, k, v, log_decay=-0.05, backend="reference")
    elif op == "block-sparse":
        idx = torch.tensor([0, 2, -1], dtype=torch.int32, device="cuda").expand(2, 2, 3, 3).contiguous()
        out = pyattn.block_sparse_attention(q, k, v, idx, block_size=16, backend="reference")
    elif op == "topk":
        out = pyattn.topk_attention(q, k, v, top_k=1, block_size=16, backend="reference")
    else:
        out = pyattn.cross_attention(q, k, v, kv_lengths=torch.tensor([33, 5], device="cuda"), backend="reference")
    out.sum().backward()
    assert out.is_cuda and q.grad is not None and torch.isfinite(q.grad).all()


# --------------------------------------------------------------------------- Triton linear attention

# B, Hq, Hkv, S, D, Dv, causal, log decay, normalize
LINEAR_CASES = [(1, 4, 2, 8192, 64, 64, True, "token", True), (2, 4, 4, 4096, 128, 128, True, "head", False),
                (1, 2, 1, 2049, 256, 64, False, "none", True), (2, 8, 2, 1000, 48, 80, True, "none", True)]


def linear_id(c):
    return "B{}-H{}/{}-S{}-D{}-Dv{}-{}-decay_{}-{}".format(*c[:6], "causal" if c[6] else "full", c[7],
                                                           "norm" if c[8] else "unnorm")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=linear_id)
def test_triton_linear_attention(case, dtype):
    """The chunked Triton kernels (bshd inputs, GQA, initial state) against the float64 reference:
    out, final state and the gradients of q, k, v, the log decay and the initial state."""
    b, hq, hkv, s, d, dv, causal, decay, normalize = case
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, dim, device="cuda", dtype=dtype, generator=gen).transpose(1, 2).requires_grad_()
               for h, dim in ((hq, d), (hkv, d), (hkv, dv)))
    g = {"none": None, "head": -0.05 * torch.rand(hq, device="cuda", generator=gen),
         "token": -0.1 * torch.rand(b, hq, s, device="cuda", generator=gen)}[decay]
    g = None if g is None else g.requires_grad_()
    state = (torch.randn(b, hq, d, dv, device="cuda", generator=gen).requires_grad_(),
             (1 + torch.rand(b, hq, d, device="cuda", generator=gen)).requires_grad_())
    grads = [torch.randn(shape, device="cuda", dtype=torch.float64, generator=gen)
             for shape in ((b, hq, s, dv), (b, hq, d, dv), (b, hq, d))]
    kw = dict(causal=causal, normalize=normalize, scale=d ** -0.5)
    got = linear_run(pyattn.linear_attention, q, k, v, g, state, grads, backend="triton", **kw)
    torch.cuda.synchronize()
    doubles = [None if x is None else x.detach().double().requires_grad_() for x in (q, k, v, g, *state)]
    want = linear_run(ref.linear_attention, *doubles[:4], tuple(doubles[4:]), grads, **kw)
    base = linear_run(ref.linear_attention, q, k, v, g, state, grads, **kw)  # the same inputs, upcast
    names = ["out", "S", "z", "dq", "dk", "dv"] + (["dlog_decay"] if g is not None else []) + ["dS0", "dz0"]
    for name, a, e, bl in zip(names, got, want, base):
        floor = LINEAR_REL_FLOOR[dtype] * e.abs().max().item()
        assert_close_relative(a, e, bl, name=name, factor=2.0, floor=floor)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_triton_linear_decoding_steps(dtype):
    """A 4000-token prefix (chunked) then 16 one-token steps (the fused recurrent kernel, state passed
    along) equal the whole sequence run at once."""
    b, hq, hkv, s, d = 2, 8, 2, 4016, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, generator=gen) for h in (hq, hkv, hkv))
    g = -0.05 * torch.rand(b, hq, s, device="cuda", generator=gen)
    whole, (s_whole, z_whole) = pyattn.linear_attention(q, k, v, log_decay=g, output_final_state=True,
                                                        backend="triton")
    out, state = pyattn.linear_attention(q[:, :, :4000], k[:, :, :4000], v[:, :, :4000], log_decay=g[:, :, :4000],
                                         output_final_state=True, backend="triton")
    outs = [out]
    for t in range(4000, s):
        out, state = pyattn.linear_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                             log_decay=g[:, :, t:t + 1], initial_state=state,
                                             output_final_state=True, backend="triton")
        outs.append(out)
    # bfloat16: the chunked kernels round products' operands to bfloat16, the token loop does not
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(outs, 2), whole, **tol)
    torch.testing.assert_close(state[0], s_whole, **tol)
    torch.testing.assert_close(state[1], z_whole, **tol)
