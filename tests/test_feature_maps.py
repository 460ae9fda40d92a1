"""`pyattn.feature_maps`: FAVOR+ is an unbiased estimate of the softmax kernel; T2R is learnable.

`tests/test_reference.py` already checks the shapes, positivity, orthogonality
and redrawing of `Favor`, that its mean squared error per pair falls with the
number of features, and that `T2R` is `relu(x W^T + b)`. Here: the estimate's
mean over many draws, the approximation of softmax attention through the
public op, and T2R trained through the public op.
"""
import math

import pytest
import torch

import pyattn
from pyattn import feature_maps as fm

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # small tensors: one thread is fastest, and on a busy machine spinning threads slow every small op down
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _softmax_attention(q, k, v):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, -1) @ v


def test_favor_is_an_unbiased_estimate_of_the_softmax_kernel():
    """The mean of phi(q).phi(k) over independent draws converges to exp(q.k / sqrt(d)).

    One `Favor(d, d * draws)` holds `draws` independent orthogonal blocks of `d`
    rows; each block alone is a `Favor(d, d)` draw (rescaled by `draws`, as
    every feature carries `1 / sqrt(d * draws)`).
    """
    dim, draws = 4, 2000
    q, k = 0.5 * _randn(6, dim, seed=1), 0.5 * _randn(6, dim, seed=2)
    exact = torch.exp((q * k).sum(-1) / math.sqrt(dim))
    torch.manual_seed(0)
    favor = fm.Favor(dim, dim * draws).double()
    products = (favor(q) * favor(k)).view(6, draws, dim)
    estimates = products.sum(-1) * draws                                  # (pairs, draws)
    mean, standard_error = estimates.mean(1), estimates.std(1) / math.sqrt(draws)
    # within 4.5 standard errors of the exact kernel for every pair (a bias of a few % would fail)
    assert ((mean - exact).abs() < 4.5 * standard_error).all(), (mean, exact, standard_error)
    assert (standard_error / exact < 0.03).all(), "too few draws for the test to detect a bias"


def test_favor_linear_attention_approaches_softmax_attention_as_features_grow():
    """Through the public op: normalised linear attention with FAVOR+ features estimates softmax attention."""
    q, k, v = 0.5 * _randn(1, 2, 16, 8, seed=1), 0.5 * _randn(1, 2, 16, 8, seed=2), _randn(1, 2, 16, 4, seed=3)
    exact = _softmax_attention(q, k, v)

    def mean_squared_error(num_features, draws=8):
        torch.manual_seed(num_features)
        errors = []
        for _ in range(draws):
            favor = fm.Favor(8, num_features).double().eval()
            out = pyattn.linear_attention(q, k, v, causal=False, feature_map=favor, backend="reference")
            errors.append((out - exact).pow(2).mean())
        return torch.stack(errors).mean().item()

    few, some, many = mean_squared_error(8), mean_squared_error(64), mean_squared_error(512)
    assert many < some / 3 < few / 9, (few, some, many)
    assert many < 2e-3


def test_favor_keeps_the_feature_dimension_free():
    favor = fm.Favor(8, 20).eval()
    q, k, v = (_randn(2, 4, 5, 8, seed=s).float() for s in (1, 2, 3))
    out, (s, z) = pyattn.linear_attention(q, k[:, :2], v[:, :2], feature_map=favor, output_final_state=True)
    assert out.shape == (2, 4, 5, 8) and s.shape == (2, 4, 20, 8) and z.shape == (2, 4, 20)


@pytest.mark.parametrize("heads_kv", [4, 2], ids=["MHA", "GQA"])
def test_t2r_gradients_reach_weight_and_bias_through_the_op(heads_kv):
    torch.manual_seed(0)
    t2r = fm.T2R(4, 7)                                   # 7 features from head_dim 4
    with torch.no_grad():
        t2r.bias.add_(0.5)                               # most features active
    q = _randn(2, 4, 6, 4, seed=1).float().requires_grad_(True)
    k = _randn(2, heads_kv, 6, 4, seed=2).float().requires_grad_(True)
    v = _randn(2, heads_kv, 6, 3, seed=3).float()
    out, (s, z) = pyattn.linear_attention(q, k, v, feature_map=t2r, output_final_state=True)
    assert out.shape == (2, 4, 6, 3) and s.shape == (2, 4, 7, 3) and z.shape == (2, 4, 7)
    (out * _randn(*out.shape, seed=4).float()).sum().backward()
    for name, p in t2r.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


def test_t2r_float32_parameters_learn_from_float64_inputs():
    t2r = fm.T2R(3, 5)
    out = pyattn.linear_attention(_randn(1, 1, 4, 3, seed=1), _randn(1, 1, 4, 3, seed=2), _randn(1, 1, 4, 2, seed=3),
                                  feature_map=t2r)
    out.sum().backward()
    assert out.dtype == F64 and t2r.weight.grad.dtype == torch.float32 and t2r.bias.grad is not None


def test_t2r_learns_a_feature_map():
    """Adam on W and b alone fits the outputs of another (teacher) T2R linear attention."""
    torch.manual_seed(0)
    teacher, student = fm.T2R(8, 16), fm.T2R(8, 16)
    q, k, v = (_randn(2, 2, 16, 8, seed=s).float() for s in (1, 2, 3))
    with torch.no_grad():
        target = pyattn.linear_attention(q, k, v, feature_map=teacher)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-2)
    losses = []
    for _ in range(40):
        loss = (pyattn.linear_attention(q, k, v, feature_map=student) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.3 * losses[0], losses[::8]
