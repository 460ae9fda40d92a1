"""Every public op runs on the reference backend through its custom op, forward and backward.

The custom-op path (checks -> backend choice -> custom op -> backend ->
autograd) must give exactly what `pyattn.reference` gives when called
directly, and its gradients must pass `gradcheck` in float64.
"""
import pytest
import torch

import pyattn
from pyattn import reference as ref
from pyattn.testing import assert_close

R = "reference"


def rand(*shape, grad=True, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def qkv(b=2, hq=4, hkv=2, sq=7, sk=9, d=5, dv=3, dtype=torch.float64):
    return rand(b, hq, sq, d, dtype=dtype), rand(b, hkv, sk, d, dtype=dtype), rand(b, hkv, sk, dv, dtype=dtype)


def same_forward_backward(ours, theirs, inputs):
    """ours(*inputs) == theirs(*inputs), and so are the gradients of a random projection."""
    a, b = ours(*inputs), theirs(*inputs)
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    for x, y in zip(a, b):
        assert_close(x, y, torch.float64, name="output")
    weights = [torch.randn_like(x) for x in b if x.is_floating_point()]
    la = sum((x * w).masked_fill(~torch.isfinite(x), 0).sum() for x, w in zip([x for x in a if x.is_floating_point()], weights))
    lb = sum((x * w).masked_fill(~torch.isfinite(x), 0).sum() for x, w in zip([x for x in b if x.is_floating_point()], weights))
    diff = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    ga = torch.autograd.grad(la, diff, allow_unused=True)
    gb = torch.autograd.grad(lb, diff, allow_unused=True)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            assert_close(x, y, torch.float64, name="gradient")


ATTENTION_CASES = {
    "plain": {},
    "causal": dict(causal=True),
    "window-softcap": dict(window=(3, 1), softcap=2.0),
    "float-bias": dict(attn_bias="float"),
    "bool-mask": dict(attn_bias="bool"),
    "dropout": dict(dropout_p=0.3),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention(case):
    kwargs = dict(ATTENTION_CASES[case])
    q, k, v = qkv()
    inputs = [q, k, v]
    if kwargs.get("attn_bias") == "float":
        inputs.append(rand(4, 1, 9))  # broadcast over batch and queries; gets a gradient
    elif kwargs.get("attn_bias") == "bool":
        inputs.append(torch.rand(2, 1, 7, 9) > 0.3)
    kwargs.pop("attn_bias", None)
    p = kwargs.get("dropout_p", 0.0)

    def ours(q, k, v, bias=None):
        torch.manual_seed(7)
        return pyattn.attention(q, k, v, attn_bias=bias, return_lse=True, backend=R, **kwargs)

    def theirs(q, k, v, bias=None):
        torch.manual_seed(7)
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64)) if p else None
        return ref.attention(q, k, v, attn_bias=bias, return_lse=True, dropout_seed=seed, **kwargs)

    same_forward_backward(ours, theirs, inputs)
    torch.autograd.gradcheck(lambda *x: ours(*x)[0], inputs)


def test_attention_varlen():
    q, k, v = rand(10, 4, 5), rand(12, 2, 5), rand(12, 2, 3)
    cu_q = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 6, 12], dtype=torch.int32)

    def ours(q, k, v):
        return pyattn.attention_varlen(q, k, v, cu_q, cu_k, 7, 6, causal=True, window=(4, -1), return_lse=True,
                                       backend=R)

    def theirs(q, k, v):
        return ref.attention_varlen(q, k, v, cu_q, cu_k, 7, 6, causal=True, window=(4, -1), return_lse=True)

    same_forward_backward(ours, theirs, [q, k, v])
    torch.autograd.gradcheck(lambda *x: ours(*x)[0], [q, k, v])


LINEAR_CASES = {
    "elu-causal": dict(),
    "relu-noncausal": dict(causal=False, feature_map="relu"),
    "identity-unnormalized": dict(feature_map="identity", normalize=False),
    "head-decay": dict(log_decay="head"),
    "token-decay-state": dict(log_decay="token", initial_state=True),
    "module-map": dict(feature_map=pyattn.feature_maps.ELU1()),
    "float-decay": dict(log_decay=-0.2, scale=0.5),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_attention(case):
    kwargs = dict(LINEAR_CASES[case])
    q, k, v = qkv(sq=6, sk=6)
    inputs = [q, k, v]
    decay, state = kwargs.pop("log_decay", None), kwargs.pop("initial_state", None)
    if decay == "head":
        inputs.append(-torch.rand(4, dtype=torch.float64).requires_grad_())
    elif decay == "token":
        inputs.append(-torch.rand(2, 4, 6, dtype=torch.float64).requires_grad_())
    else:
        inputs.append(decay)
    if state:
        inputs += [rand(2, 4, 5, 3), torch.rand(2, 4, 5, dtype=torch.float64).requires_grad_()]

    def run(fn, backend):
        def call(q, k, v, decay=None, s0=None, z0=None):
            init = None if s0 is None else (s0, z0)
            out, (s, z) = fn(q, k, v, log_decay=decay, initial_state=init, output_final_state=True, **backend,
                             **kwargs)
            return out, s, z
        return call

    same_forward_backward(run(pyattn.linear_attention, dict(backend=R)), run(ref.linear_attention, {}), inputs)
    # gradcheck over the tensor inputs; a float or absent decay is passed through as it is
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    fixed = [] if isinstance(inputs[3], torch.Tensor) else [inputs[3]]
    call = run(pyattn.linear_attention, dict(backend=R))
    torch.autograd.gradcheck(lambda q, k, v, *rest: call(q, k, v, *fixed, *rest), tensors)


def test_linear_attention_default_returns_out_only():
    q, k, v = qkv(sq=6, sk=6)
    out = pyattn.linear_attention(q, k, v, backend=R)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4, 6, 3)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_block_sparse_attention(causal):
    q, k, v = qkv(b=1, hq=2, hkv=1, sq=10, sk=13, d=3, dv=2)
    indices = torch.tensor([[0, 3, -1], [2, -1, 2], [1, 0, 3]], dtype=torch.int32).expand(1, 1, 3, 3).contiguous()

    def ours(q, k, v):
        return pyattn.block_sparse_attention(q, k, v, indices, block_size=4, causal=causal, return_lse=True,
                                             backend=R)

    def theirs(q, k, v):
        return ref.block_sparse_attention(q, k, v, indices, block_size=4, causal=causal, return_lse=True)

    same_forward_backward(ours, theirs, [q, k, v])
    torch.autograd.gradcheck(lambda *x: ours(*x)[0], [q, k, v])


def test_topk_attention():
    q, k, v = qkv(b=1, hq=2, hkv=1, sq=13, sk=13, d=3, dv=2)
    kwargs = dict(top_k=1, block_size=4, causal=True, num_sink_blocks=1, num_local_blocks=1)
    out, idx = pyattn.topk_attention(q, k, v, return_block_indices=True, backend=R, **kwargs)
    ref_out, ref_idx = ref.topk_attention(q, k, v, return_block_indices=True, **kwargs)
    assert torch.equal(idx, ref_idx[..., :idx.shape[-1]])
    assert_close(out, ref_out, name="out")
    torch.autograd.gradcheck(lambda *x: pyattn.topk_attention(*x, backend=R, **kwargs), [q, k, v])


def test_topk_covering_every_block_is_dense_attention():
    q, k, v = qkv(sq=13, sk=21)
    out = pyattn.topk_attention(q, k, v, top_k=1000, block_size=4, causal=True, backend=R)
    assert_close(out, pyattn.attention(q, k, v, causal=True, backend=R), name="out")


def test_cross_attention_broadcast_latents():
    latents = rand(1, 4, 3, 5)
    k, v = rand(2, 2, 11, 5), rand(2, 2, 11, 3)
    lengths = torch.tensor([11, 4])
    padding = torch.zeros(2, 11, dtype=torch.bool)
    padding[0, 2] = True

    def ours(latents, k, v):
        return pyattn.cross_attention(latents.expand(2, -1, -1, -1), k, v, kv_lengths=lengths,
                                      key_padding_mask=padding, return_lse=True, backend=R)

    def theirs(latents, k, v):
        return ref.cross_attention(latents.expand(2, -1, -1, -1), k, v, kv_lengths=lengths,
                                   key_padding_mask=padding, return_lse=True)

    same_forward_backward(ours, theirs, [latents, k, v])
    torch.autograd.gradcheck(lambda *x: ours(*x)[0], [latents, k, v])


@pytest.mark.parametrize("op", ["attention", "linear", "cross", "sparse"])
def test_empty_sequences(op):
    q, k, v = qkv(sq=0, sk=0)
    if op == "attention":
        out = pyattn.attention(q, k, v, backend=R)
    elif op == "linear":
        out, (s, z) = pyattn.linear_attention(q, k, v, output_final_state=True, backend=R)
        assert torch.equal(s, torch.zeros_like(s)) and torch.equal(z, torch.zeros_like(z))
    elif op == "cross":
        out = pyattn.cross_attention(q, k, v, backend=R)
    else:
        out = pyattn.block_sparse_attention(q, k, v, torch.zeros(2, 2, 0, 1, dtype=torch.int32), backend=R)
    assert out.shape == (2, 4, 0, 3)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_no_keys_gives_zeros_and_minus_inf():
    q, k, v = qkv(sq=3, sk=0)
    out, lse = pyattn.attention(q, k, v, return_lse=True, backend=R)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())


def test_non_contiguous_bshd_views():
    buf_q, buf_kv = rand(2, 7, 4, 5, grad=False), rand(2, 9, 2, 5, grad=False)
    q, k, v = buf_q.transpose(1, 2), buf_kv.transpose(1, 2), buf_kv.transpose(1, 2)
    assert_close(pyattn.attention(q, k, v, causal=True, backend=R),
                 ref.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True), name="out")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_low_precision_output_dtype(dtype):
    q, k, v = qkv(dtype=dtype)
    out, lse = pyattn.attention(q, k, v, return_lse=True, backend=R)
    assert out.dtype == dtype and lse.dtype == torch.float32
    expected = ref.attention(q.double(), k.double(), v.double())
    assert_close(out, expected, dtype, name="out")


def test_huge_block_size_costs_no_memory():
    q, k, v = qkv(sq=10, sk=10)
    out = pyattn.block_sparse_attention(q, k, v, torch.zeros(2, 2, 1, 1, dtype=torch.int32), block_size=2**40,
                                        causal=False, backend=R)
    assert_close(out, ref.attention(q, k, v), name="out")  # one block holds every key
