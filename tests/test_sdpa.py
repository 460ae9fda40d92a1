"""`pyattn.scaled_dot_product_attention` is torch's, swapped in: same outputs and gradients."""
import pytest
import torch
import torch.nn.functional as F

import pyattn
from pyattn.testing import assert_close


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


CASES = {
    # id: (q shape, k shape, v shape, kwargs)
    "4d": ((2, 4, 7, 8), (2, 4, 9, 8), (2, 4, 9, 6), {}),
    "causal-square": ((2, 4, 7, 8), (2, 4, 7, 8), (2, 4, 7, 8), dict(is_causal=True)),
    "causal-top-left-short-q": ((1, 2, 3, 8), (1, 2, 9, 8), (1, 2, 9, 8), dict(is_causal=True)),
    "causal-top-left-long-q": ((1, 2, 9, 8), (1, 2, 4, 8), (1, 2, 4, 8), dict(is_causal=True)),
    "gqa": ((2, 8, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8), dict(enable_gqa=True)),
    "bool-mask-2d": ((2, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8), dict(attn_mask="bool", mask_shape=(5, 6))),
    "float-mask-4d": ((2, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8), dict(attn_mask="float", mask_shape=(2, 1, 5, 6))),
    "scale": ((2, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8), dict(scale=0.05)),
    "3d": ((4, 5, 8), (4, 6, 8), (4, 6, 8), {}),
    "5d-masked": ((3, 2, 2, 5, 8), (3, 2, 2, 6, 8), (3, 2, 2, 6, 4), dict(attn_mask="bool", mask_shape=(2, 1, 5, 6))),
    "broadcast-kv-batch": ((2, 4, 5, 8), (1, 4, 6, 8), (1, 4, 6, 8), {}),
    "fully-masked-row": ((1, 2, 3, 8), (1, 2, 4, 8), (1, 2, 4, 8), dict(attn_mask="row0", mask_shape=(3, 4))),
    "broadcast-q-heads": ((2, 1, 5, 8), (2, 4, 7, 8), (2, 4, 7, 8), {}),
    "2d-q-3d-kv": ((5, 8), (2, 7, 8), (2, 7, 8), {}),
    "broadcast-k-heads": ((2, 4, 5, 8), (2, 1, 7, 8), (2, 4, 7, 8), {}),
    "gqa-mqa": ((2, 8, 5, 8), (2, 1, 7, 8), (2, 1, 7, 8), dict(enable_gqa=True)),
    "zero-head-dim": ((1, 2, 5, 0), (1, 2, 7, 0), (1, 2, 7, 8), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(case):
    qs, ks, vs, kwargs = CASES[case]
    kwargs = dict(kwargs)
    q, k, v = rand(*qs), rand(*ks), rand(*vs)
    kind, shape = kwargs.pop("attn_mask", None), kwargs.pop("mask_shape", None)
    if kind == "bool":
        kwargs["attn_mask"] = torch.rand(shape) > 0.3
    elif kind == "float":
        kwargs["attn_mask"] = torch.randn(shape, dtype=torch.float64)
    elif kind == "row0":
        mask = torch.ones(shape, dtype=torch.bool)
        mask[0] = False
        kwargs["attn_mask"] = mask
    ours = pyattn.scaled_dot_product_attention(q, k, v, **kwargs)
    theirs = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert_close(ours, theirs, name="out")
    w = torch.randn_like(theirs)
    for a, b in zip(torch.autograd.grad((ours * w).sum(), (q, k, v)), torch.autograd.grad((theirs * w).sum(), (q, k, v))):
        assert_close(a, b, name="grad")


def test_mask_may_not_enlarge_the_output():
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8)
    mask = torch.rand(3, 2, 5, 7) > 0.5
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, k, attn_mask=mask)
    with pytest.raises(ValueError, match="broadcast shape"):
        pyattn.scaled_dot_product_attention(q, k, k, attn_mask=mask)


def test_dropout_one_gives_zeros_like_torch():
    q = torch.randn(1, 2, 5, 8)
    assert torch.equal(pyattn.scaled_dot_product_attention(q, q, q, dropout_p=1.0), torch.zeros_like(q))


def test_float32_inference_runs_on_the_cpu_kernel(no_default_backend):
    q, k, v = (torch.randn(2, 4, 33, 16) for _ in range(3))
    assert_close(pyattn.scaled_dot_product_attention(q, k, v, is_causal=True),
                 F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True),
                 torch.float32, name="out")


def test_dropout_keeps_expectation():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 6, 8), torch.ones(1, 1, 6, 2)
    outs = torch.stack([pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5) for _ in range(400)])
    # with v = 1 each output is the kept probability mass / (1 - p): mean 1
    assert abs(outs.mean().item() - 1.0) < 0.05
    torch.manual_seed(3)
    a = pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    assert torch.equal(a, pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5))


def test_float32_mask_with_float64_inputs_like_torch():
    q = rand(1, 2, 5, 8)
    mask = torch.randn(5, 5, requires_grad=True)
    out = pyattn.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    want = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert out.dtype == want.dtype == torch.float64
    assert_close(out, want, torch.float64)
    (got_q, got_mask), (want_q, want_mask) = (torch.autograd.grad(o.sum(), (q, mask)) for o in (out, want))
    assert_close(got_q, want_q, torch.float64)
    assert_close(got_mask, want_mask, torch.float32)
