"""Every family is a custom op with a fake: opcheck passes and torch.compile(fullgraph=True) traces it."""
import pytest
import torch

import pyattn
from pyattn.ops import cross, linear, softmax, sparse

R = "reference"


def rand(*shape):
    return torch.randn(*shape, requires_grad=True)


CALLS = {
    "attention": lambda q, k, v: pyattn.attention(q, k, v, causal=True, window=(4, 0), softcap=5.0, backend=R),
    "attention-cpu-kernel": lambda q, k, v: pyattn.attention(q.detach(), k.detach(), v.detach(), causal=True),
    "sdpa": lambda q, k, v: pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    "varlen": lambda q, k, v: pyattn.attention_varlen(
        q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
        torch.tensor([0, 3, 9], dtype=torch.int32), torch.tensor([0, 3, 9], dtype=torch.int32), 6, 6,
        causal=True, backend=R),
    "linear": lambda q, k, v: pyattn.linear_attention(q, k, v, log_decay=-0.1, backend=R),
    "block-sparse": lambda q, k, v: pyattn.block_sparse_attention(
        q, k, v, torch.tensor([0, 1, -1], dtype=torch.int32).expand(2, 2, 3, 3), block_size=4, backend=R),
    "topk": lambda q, k, v: pyattn.topk_attention(q, k, v, top_k=1, block_size=4, backend=R),
    "cross": lambda q, k, v: pyattn.cross_attention(q, k, v, kv_lengths=torch.tensor([9, 5]), backend=R),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_compile_fullgraph(name, no_default_backend):
    torch._dynamo.reset()
    q, k, v = rand(2, 4, 9, 8), rand(2, 2, 9, 8), rand(2, 2, 9, 8)
    fn = CALLS[name]
    expected = fn(q, k, v)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    torch.testing.assert_close(got, expected)
    if got.requires_grad:
        (g_expected,) = torch.autograd.grad(expected.sum(), q)
        (g_got,) = torch.autograd.grad(compiled(q, k, v).sum(), q)
        torch.testing.assert_close(g_got, g_expected)


def test_compile_inductor_attention(no_default_backend):
    torch._dynamo.reset()
    q, k, v = rand(1, 2, 9, 8), rand(1, 2, 9, 8), rand(1, 2, 9, 8)
    fn = lambda q, k, v: pyattn.attention(q, k, v, causal=True, backend=R).sum()  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v))


def _opcheck_cases():
    q, k, v = rand(2, 4, 9, 8), rand(2, 2, 9, 8), rand(2, 2, 9, 8)
    bias = rand(1, 4, 9, 9)
    p = dict(dropout_seed=None, causal=True, scale=0.3, window_left=-1, window_right=-1, softcap=0.0,
             dropout_p=0.0)
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)
    packed = [x[0].transpose(0, 1).detach().requires_grad_() for x in (q, k, v)]
    yield "attention", softmax._ATTENTION.forward_op, (q, k, v, bias, *p.values(), R)
    yield "varlen", softmax._ATTENTION_VARLEN.forward_op, (*packed, cu, cu, 6, 6, *p.values(), R)
    yield "linear", linear._LINEAR_ATTENTION.forward_op, (
        q, k, v, -torch.rand(2, 4, 9).requires_grad_(), None, None, True, "elu", True, 1.0, 1e-6, R)
    yield "block-sparse", sparse._BLOCK_SPARSE.forward_op, (
        q, k, v, torch.tensor([0, 2, -1], dtype=torch.int32).expand(2, 2, 3, 3).contiguous(), 4, True, 0.3, R)
    yield "topk", sparse._topk_block_indices, (q.detach(), k.detach(), 1, 4, True, 0.3, 1, 1, R)
    yield "cross", cross._CROSS_ATTENTION.forward_op, (q, k, v, torch.tensor([9, 4]), None, 0.3, R)


@pytest.mark.parametrize("name,op,args", list(_opcheck_cases()), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", ["attention", "sdpa", "varlen", "linear", "cross"])
def test_compile_dynamic_shapes(name, no_default_backend):
    torch._dynamo.reset()
    q, k, v = rand(2, 4, 9, 8), rand(2, 2, 9, 8), rand(2, 2, 9, 8)
    fn = CALLS[name]
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))


BAD_VALUES = {
    # id: (call, words of the error); the values are only known when the compiled graph runs
    "log-decay-positive": (lambda q, k, v: pyattn.linear_attention(q, k, v, log_decay=torch.full((2, 4, 9), 3.0),
                                                                   backend=R), "log_decay"),
    "log-decay-nan": (lambda q, k, v: pyattn.linear_attention(q, k, v, log_decay=torch.full((4,), float("nan")),
                                                              backend=R), "log_decay"),
    "kv-lengths": (lambda q, k, v: pyattn.cross_attention(q, k, v, kv_lengths=torch.tensor([100, 2]), backend=R),
                   "kv_lengths"),
    "cu-seqlens": (lambda q, k, v: pyattn.attention_varlen(
        q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
        torch.tensor([0, 6, 3, 9], dtype=torch.int32), torch.tensor([0, 3, 6, 9], dtype=torch.int32), 9, 9,
        backend=R), "cu_seqlens_q"),
    "block-indices": (lambda q, k, v: pyattn.block_sparse_attention(
        q, k, v, torch.full((2, 2, 3, 1), 7, dtype=torch.int32), block_size=4, backend=R), "block_indices"),
}


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_value_checks_run_in_compiled_graphs(name):
    torch._dynamo.reset()
    q, k, v = rand(2, 4, 9, 8), rand(2, 2, 9, 8), rand(2, 2, 9, 8)
    call, word = BAD_VALUES[name]
    with pytest.raises(ValueError, match=word):
        call(q, k, v)
    with pytest.raises(ValueError, match=word):
        torch.compile(call, fullgraph=True, backend="aot_eager")(q, k, v)
