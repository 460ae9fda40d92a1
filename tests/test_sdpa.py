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


@pytest.mark.parametrize("mask", ["bool-0d", "bool-1d", "float-0d", "float-1d"])
def test_low_dim_mask_broadcasts_like_torch_math_backend(mask):
    # torch's CPU backend choice raises IndexError on these; its math backend (and its meta path) broadcast them
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.randn(2, 3, 6, 8, dtype=torch.float64)
    shape = () if mask.endswith("0d") else (6,)
    m = torch.rand(shape) > 0.3 if mask.startswith("bool") else torch.randn(shape, dtype=torch.float64)
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, k, attn_mask=m)
    mask32 = m if m.dtype == torch.bool else m.float()
    assert_close(pyattn.scaled_dot_product_attention(q.float(), k.float(), k.float(), attn_mask=mask32), expected,
                 torch.float32, name="out")


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


PLAIN_CASES = {  # the calls a model makes: all must skip torch's slow checks on meta tensors
    "4d": ((2, 4, 7, 8), (2, 4, 9, 8), (2, 4, 9, 6), {}),
    "decode-gqa": ((1, 8, 1, 16), (1, 2, 33, 16), (1, 2, 33, 16), dict(enable_gqa=True)),
    "causal": ((2, 4, 7, 8), (2, 4, 7, 8), (2, 4, 7, 8), dict(is_causal=True, scale=0.3)),
    "3d": ((4, 5, 8), (4, 6, 8), (4, 6, 8), {}),
    "bool-mask-2d": ((2, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8), dict(attn_mask=(5, 6))),
    "padding-mask-4d": ((2, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8), dict(attn_mask=(2, 1, 1, 6))),
}


@pytest.mark.parametrize("case", list(PLAIN_CASES))
def test_plain_calls_skip_the_meta_checks(case, monkeypatch):
    from pyattn.ops import sdpa

    def no_meta(x):
        raise AssertionError("torch's checks on meta tensors ran (~3 ms a call)")

    monkeypatch.setattr(sdpa, "_meta", no_meta)
    qs, ks, vs, kwargs = PLAIN_CASES[case]
    kwargs = dict(kwargs)
    q, k, v = (torch.randn(*s) for s in (qs, ks, vs))
    if "attn_mask" in kwargs:
        kwargs["attn_mask"] = torch.rand(kwargs["attn_mask"]) > 0.2
    assert_close(pyattn.scaled_dot_product_attention(q, k, v, **kwargs),
                 F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **{
                     key: (val.clone() if isinstance(val, torch.Tensor) else val) for key, val in kwargs.items()}),
                 torch.float32, name="out")


def _random_call(gen):
    """Random SDPA arguments on meta tensors, near the plain ones: shapes, flags and masks torch may reject."""
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=gen))]  # noqa: E731
    dims = pick([2, 3, 4, 4, 4, 5])
    lead = [pick([1, 2, 3]) for _ in range(dims - 3)]
    heads_q, heads_k = pick([1, 2, 4, 8]), pick([1, 2, 4, 8])
    L, S, E, Ev = pick([0, 1, 5]), pick([0, 1, 6]), pick([8, 8, 4]), pick([8, 6])
    shape = lambda heads, n, e: tuple(pick([x, x, x, x, x, 1]) for x in lead) + (  # noqa: E731
        (heads,) if dims >= 3 else ()) + (n, e)
    dtype = pick([torch.float32, torch.float32, torch.float16, torch.float64])
    q = torch.empty(shape(heads_q, L, E), dtype=dtype, device="meta")
    k = torch.empty(shape(heads_k, S, pick([E, E, E, E, 4])), dtype=pick([dtype, dtype, dtype, torch.float32]), device="meta")
    v = torch.empty(shape(pick([heads_k, heads_k, heads_k, heads_q]), pick([S, S, S, S, 2]), Ev), dtype=dtype, device="meta")
    kwargs = dict(is_causal=pick([False, False, True]), enable_gqa=pick([False, True]), scale=pick([None, 0.5]))
    if pick([False, True]):
        full = q.shape[:-1] + (S,)
        mask_shape = tuple(pick([x, x, 1, 2]) for x in full[-pick([1, 2, 3, 4]):])
        kwargs["attn_mask"] = torch.empty(mask_shape, dtype=pick([torch.bool, dtype, torch.float32, torch.int32]),
                                          device="meta")
    return q, k, v, kwargs


def test_plain_shape_is_torch_shape():
    from pyattn.ops.sdpa import _plain_output_shape

    gen = torch.Generator().manual_seed(0)
    plain = 0
    for _ in range(3000):
        q, k, v, kwargs = _random_call(gen)
        shape = _plain_output_shape(q, k, v, kwargs.get("attn_mask"), kwargs["is_causal"], kwargs["scale"],
                                    kwargs["enable_gqa"])
        if shape is None:
            continue
        plain += 1
        context = f"q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, v {tuple(v.shape)}, {kwargs}"
        try:  # torch accepts every plain call, with that output shape, and a mask does not grow it
            assert F.scaled_dot_product_attention(q, k, v, **kwargs).shape == shape, context
            unmasked = dict(kwargs, attn_mask=None, is_causal=False)
            assert F.scaled_dot_product_attention(q, k, v, **unmasked).shape == shape, context
        except RuntimeError as error:
            raise AssertionError(f"torch rejects a plain call: {context}: {error}") from error
    assert plain > 150  # the grid reaches the fast path often enough to mean something
