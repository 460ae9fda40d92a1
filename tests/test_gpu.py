"""On a CUDA device: the CUDA C++ softmax forward against the reference, and every op's reference
backend on CUDA tensors. Run with `python -m pytest -m gpu`; skipped without a GPU.

Tolerance: the relative rule of `pyattn.testing.assert_close_relative`: the kernel's error
against float64 is at most twice the rounding error of the float64 result cast to the kernel's
dtype, plus that dtype's atol.
"""
import pytest
import torch

import pyattn
from pyattn import reference as ref
from pyattn.testing import assert_close, assert_close_relative

pytestmark = pytest.mark.gpu

# B, Hq, Hkv, Sq, Sk, D, Dv
SHAPES = [(1, 2, 2, 1, 1, 64, 64), (2, 4, 2, 97, 130, 64, 64), (1, 8, 1, 3, 1000, 128, 128),
          (2, 4, 4, 257, 257, 80, 80), (1, 2, 2, 130, 61, 128, 96), (1, 16, 2, 2048, 2048, 128, 128)]
MASKS = {"full": dict(), "causal": dict(causal=True), "window": dict(window=(64, 16)),
         "causal-softcap": dict(causal=True, softcap=30.0)}


def shape_id(s):
    return "B{}-H{}/{}-Sq{}-Sk{}-D{}-Dv{}".format(*s)


def inputs(shape, dtype, layout="bhsd"):
    b, hq, hkv, sq, sk, d, dv = shape
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(h, s, dim):
        if layout == "bshd":
            return torch.randn(b, s, h, dim, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
        return torch.randn(b, h, s, dim, device="cuda", dtype=dtype, generator=gen)

    return rand(hq, sq, d), rand(hkv, sk, d), rand(hkv, sk, dv)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_cuda_softmax_forward(shape, dtype, mask, layout):
    q, k, v = inputs(shape, dtype, layout)
    out, lse = pyattn.attention(q, k, v, return_lse=True, backend="cuda", **MASKS[mask])
    torch.cuda.synchronize()
    want, want_lse = ref.attention(q.double(), k.double(), v.double(), return_lse=True, **MASKS[mask])
    # the float64 truth rounded to the kernel's dtype: the least error any kernel can have
    baseline = want.to(dtype)
    assert_close_relative(out, want, baseline, name="out")
    assert_close(lse, want_lse, torch.float32 if dtype == torch.float32 else torch.float16, name="lse")


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
