"""Backend registry, per-call choice, PYATTN_BACKEND and explain."""
import pytest
import torch

import pyattn


def qkv(dtype=torch.float32, grad=False):
    return [torch.randn(1, 2, 5, 8, dtype=dtype, requires_grad=grad) for _ in range(3)]


def test_backends_lists_every_name_with_reason():
    status = pyattn.backends()
    assert list(status) == ["cuda", "triton", "cpu", "reference"]
    assert status["reference"].available and status["reference"].reason is None
    for name, s in status.items():
        assert s.available == (s.reason is None), name
        assert bool(s) == s.available
    if not torch.cuda.is_available():
        assert not status["cuda"].available and status["cuda"].reason


def test_cpu_backend_is_built_here():
    assert pyattn.backends()["cpu"].available, pyattn.backends()["cpu"].reason


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_none_picks_cpu_kernel_for_cpu_tensors(no_default_backend, grad):
    q, k, v = qkv(grad=grad)
    assert pyattn.explain(pyattn.attention, q, k, v, causal=True).backend == "cpu"
    plan = pyattn.explain(pyattn.scaled_dot_product_attention, q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool))
    assert plan.backend == "cpu"  # the SDPA drop-in runs on the fast kernel too
    assert "interpreter" in dict(plan.passed_over).get("triton", "interpreter")


def test_none_falls_back_to_reference_with_reasons(no_default_backend):
    q, k, v = qkv(dtype=torch.float64, grad=True)
    plan = pyattn.explain("attention", q, k, v)
    assert plan.backend == "reference"
    reasons = dict(plan.passed_over)
    assert "float64" in reasons["cpu"]
    assert "cpu" in str(plan) and "reference" in str(plan)


def test_named_backend_that_cannot_run_raises(no_default_backend):
    q, k, v = qkv(dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="cpu.*float64"):
        pyattn.attention(q, k, v, backend="cpu")
    with pytest.raises(NotImplementedError, match="cuda"):
        pyattn.attention(*qkv(), backend="cuda")


def test_env_sets_default_and_never_falls_back(monkeypatch):
    q, k, v = qkv(dtype=torch.float64, grad=True)
    monkeypatch.setenv("PYATTN_BACKEND", "reference")
    assert pyattn.explain(pyattn.attention, q, k, v).backend == "reference"
    monkeypatch.setenv("PYATTN_BACKEND", "cpu")
    with pytest.raises(NotImplementedError, match="PYATTN_BACKEND"):
        pyattn.attention(q, k, v)
    # an explicit backend= wins over the environment
    pyattn.attention(q, k, v, backend="reference")


def test_cpu_kernel_matches_reference_backend(no_default_backend):
    q, k, v = qkv()
    out, lse = pyattn.attention(q, k, v, causal=True, return_lse=True)
    ref_out, ref_lse = pyattn.attention(q, k, v, causal=True, return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("name", ["attention", "attention_varlen", "scaled_dot_product_attention", "linear_attention",
                                  "block_sparse_attention", "topk_attention", "cross_attention"])
def test_explain_every_op(name, no_default_backend):
    q, k, v = qkv()
    packed = [x[0].transpose(0, 1) for x in (q, k, v)]
    cu = torch.tensor([0, 5], dtype=torch.int32)
    args = {
        "attention_varlen": (*packed, cu, cu, 5, 5),
        "block_sparse_attention": (q, k, v, torch.zeros(1, 2, 1, 1, dtype=torch.int32)),
    }.get(name, (q, k, v))
    kwargs = {"topk_attention": dict(top_k=1)}.get(name, {})
    plan = pyattn.explain(name, *args, **kwargs)
    assert plan.backend in pyattn.backends() and plan.kernel
    assert plan == pyattn.explain(getattr(pyattn, name), *args, **kwargs)


def test_explain_rejects_unknown_op():
    with pytest.raises(ValueError, match="op"):
        pyattn.explain("flash", *qkv())


def test_explain_checks_inputs_like_the_call():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="window"):
        pyattn.explain(pyattn.attention, q, k, v, window=(-3, 0))
