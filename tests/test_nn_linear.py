"""`pyattn.nn.LinearAttention`: the layer is its projections around the reference linear attention.

The expected outputs are built here in plain torch (F.linear, per-head feature
maps applied head by head) around `pyattn.reference.linear_attention` in
float64, independently of the layer's own batched code.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import pyattn
from pyattn import feature_maps as fm
from pyattn import reference as ref
from pyattn.nn import LinearAttention, PerHeadFeatureMap
from pyattn.testing import assert_close

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


def _tanh_plus_one(x):
    return torch.tanh(x) + 1.0


# name -> (constructor kwargs); E = 24, 4 query heads of 6
CASES = {
    "elu-H4": dict(feature_map="elu"),
    "relu-H4/2": dict(feature_map="relu", num_kv_heads=2),
    "identity-H4-nobias-unnormalized": dict(feature_map="identity", bias=False, normalize=False),  # q.z may be ~0
    "t2r-H4/2-F5": dict(feature_map="t2r", num_kv_heads=2, feature_dim=5),
    "t2r-H4/1-F9": dict(feature_map="t2r", num_kv_heads=1, feature_dim=9),
    "favor-H4-F16": dict(feature_map="favor", feature_dim=16),
    "class-T2R-H4-F7": dict(feature_map=fm.T2R, feature_dim=7),
    "class-Favor-H4/2-F8": dict(feature_map=fm.Favor, num_kv_heads=2, feature_dim=8),
    "module-ELU1-H4": dict(feature_map=fm.ELU1()),
    "module-T2R-shared-H4/2": dict(feature_map=fm.T2R(6, 10), num_kv_heads=2),
    "callable-H4": dict(feature_map=_tanh_plus_one),
    "elu-noncausal-H4": dict(feature_map="elu", causal=False),
    "t2r-noncausal-H4/2": dict(feature_map="t2r", causal=False, num_kv_heads=2, feature_dim=4),
}


def _layer(seed=0, embed_dim=24, num_heads=4, **kwargs):
    torch.manual_seed(seed)
    return LinearAttention(embed_dim, num_heads, **kwargs).eval()


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _expected(layer, query, key=None, value=None, state=None):
    """The layer's output in float64 plain torch: projections, per-head features, the reference, out_proj."""
    key = query if key is None else key
    value = key if value is None else value
    p = {n: t.detach().to(F64) for n, t in layer.named_parameters()}

    def project(x, name, heads):
        y = F.linear(x.to(F64), p[f"{name}.weight"], p.get(f"{name}.bias"))
        return y.view(x.shape[0], x.shape[1], heads, layer.head_dim).transpose(1, 2)

    q = project(query, "q_proj", layer.num_heads)
    k = project(key, "k_proj", layer.num_kv_heads)
    v = project(value, "v_proj", layer.num_kv_heads)
    fmap = layer._fused if layer._fused is not None else layer.feature_map
    if isinstance(layer.feature_map, PerHeadFeatureMap):
        group = layer.num_heads // layer.num_kv_heads
        maps = [copy.deepcopy(m).to(F64) for m in layer.feature_map.maps]
        q = torch.stack([maps[h // group](q[:, h]) for h in range(layer.num_heads)], 1)
        k = torch.stack([maps[j](k[:, j]) for j in range(layer.num_kv_heads)], 1)
        fmap = "identity"
    elif isinstance(fmap, torch.nn.Module):
        fmap = copy.deepcopy(fmap).to(F64)
    out, new_state = ref.linear_attention(q, k, v, causal=layer.causal, feature_map=fmap, normalize=layer.normalize,
                                          scale=layer.scale, eps=layer.eps, initial_state=state,
                                          output_final_state=True)
    out = out.transpose(1, 2).reshape(query.shape[0], query.shape[1], layer.embed_dim)
    return F.linear(out, p["out_proj.weight"], p.get("out_proj.bias")), new_state


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_matches_plain_torch_around_the_reference(case):
    layer = _layer(**case)
    x = _x(2, 7, 24)
    with torch.no_grad():
        actual, (s, z) = layer(x, return_state=True)
        expected, (s_ref, z_ref) = _expected(layer, x)
    assert actual.shape == x.shape and actual.dtype == x.dtype
    feature_dim = s_ref.shape[2]
    assert s.shape == (2, 4, feature_dim, 6) and z.shape == (2, 4, feature_dim) and s.dtype == torch.float32
    if layer.feature_dim is not None:
        assert layer.feature_dim == feature_dim
    assert_close(actual, expected, torch.float32, name="out")
    assert_close(s, s_ref, torch.float32, name="state S")
    assert_close(z, z_ref, torch.float32, name="state z")


def test_batch_first_false_is_the_transposed_layout():
    first = _layer(feature_map="t2r", num_kv_heads=2)
    second = _layer(feature_map="t2r", num_kv_heads=2, batch_first=False)
    second.load_state_dict(first.state_dict())
    x = _x(3, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(second(x.transpose(0, 1)).transpose(0, 1), first(x))
        y, state = second.step(x[:, 0])
        torch.testing.assert_close(y, first(x[:, :1])[:, 0])


def test_noncausal_key_value_inputs_with_their_own_widths():
    layer = _layer(feature_map="t2r", causal=False, kdim=10, vdim=12, num_kv_heads=2, feature_dim=5)
    query, key, value = _x(2, 6, 24, seed=1), _x(2, 6, 10, seed=2), _x(2, 6, 12, seed=3)
    with torch.no_grad():
        actual = layer(query, key, value)
        expected, _ = _expected(layer, query, key, value)
    assert_close(actual, expected, torch.float32, name="out")


@pytest.mark.parametrize("name", ["elu-H4", "relu-H4/2", "t2r-H4/2-F5", "class-Favor-H4/2-F8", "module-T2R-shared-H4/2",
                                  "callable-H4"])
def test_step_by_step_decoding_equals_the_full_forward(name):
    layer = _layer(**CASES[name])
    x = _x(2, 9, 24)
    with torch.no_grad():
        full, (s_full, z_full) = layer(x, return_state=True)
        state, outs, shapes = None, [], set()
        for t in range(9):
            y, state = layer.step(x[:, t], state)
            outs.append(y)
            shapes.add((tuple(state[0].shape), tuple(state[1].shape)))
        # chunked: a prefill of 4 tokens, then the rest from its state
        head, mid = layer(x[:, :4], return_state=True)
        tail = layer(x[:, 4:], state=mid)
    assert len(shapes) == 1, "the state must keep one size whatever the number of tokens"
    assert_close(torch.stack(outs, 1), full, torch.float32, name="step outputs")
    assert_close(state[0], s_full, torch.float32, name="S")
    assert_close(state[1], z_full, torch.float32, name="z")
    assert_close(torch.cat([head, tail], 1), full, torch.float32, name="chunked")


def test_initial_state_is_the_empty_context():
    layer = _layer(feature_map="t2r", feature_dim=5)
    x = _x(2, 4, 24)
    s, z = layer.initial_state(2)
    assert s.shape == (2, 4, 5, 6) and z.shape == (2, 4, 5) and not s.any() and not z.any()
    with torch.no_grad():
        torch.testing.assert_close(layer(x, state=(s, z)), layer(x))
    with pytest.raises(ValueError, match="feature dim"):
        _layer(feature_map=_tanh_plus_one).initial_state(2)


def test_step_goes_through_the_op_with_one_token(monkeypatch):
    """Decoding runs `pyattn.linear_attention` on one token with the state: no growing context."""
    import pyattn.nn.linear as module
    seen, op = [], module.linear_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.shape[2], k.shape[2], kwargs["initial_state"] is not None))
        return op(q, k, v, **kwargs)

    monkeypatch.setattr(module, "linear_attention", spy)
    layer = _layer(feature_map="elu")
    state = None
    with torch.no_grad():
        for t in range(5):
            _, state = layer.step(_x(2, 24, seed=t), state)
    assert seen == [(1, 1, False)] + [(1, 1, True)] * 4


@pytest.mark.parametrize("name", ["elu-H4", "t2r-H4/2-F5", "class-T2R-H4-F7", "module-T2R-shared-H4/2",
                                  "t2r-noncausal-H4/2"])
def test_gradients_reach_every_parameter(name):
    layer = _layer(**CASES[name]).train()
    x = _x(2, 6, 24).requires_grad_(True)
    state = tuple(t.requires_grad_(True) for t in _layer(**CASES[name]).initial_state(2)) \
        if layer.causal else None
    out = layer(x, state=state)
    (out * _x(*out.shape, seed=9)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for n, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    if state is not None:
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in state)


def test_gradcheck_float64():
    torch.manual_seed(0)
    layer = LinearAttention(8, 2, "t2r", num_kv_heads=1, feature_dim=3, dtype=F64).eval()
    with torch.no_grad():  # keep relu features away from all-zero rows, where the output has a kink
        for m in layer.feature_map.maps:
            m.bias.add_(1.0)
    x = _x(1, 4, 8).to(F64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))


def test_favor_redraws_only_while_training():
    layer = _layer(feature_map="favor", feature_dim=8)
    x = _x(1, 5, 24)
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))
        layer.train()
        assert not torch.equal(layer(x), layer(x))


def test_parameters_and_exports():
    layer = _layer(feature_map="t2r", num_kv_heads=2, feature_dim=5)
    names = {n for n, _ in layer.named_parameters()}
    assert {"q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "out_proj.bias",
            "feature_map.maps.0.weight", "feature_map.maps.1.bias"} <= names
    assert layer.k_proj.weight.shape == (12, 24) and layer.feature_map.maps[0].weight.shape == (5, 6)
    assert pyattn.nn.LinearAttention is LinearAttention
    assert "num_kv_heads=2" in repr(layer) and "feature_dim=5" in repr(layer)
    favor = _layer(feature_map="favor", feature_dim=16)
    assert dict(favor.named_buffers())["feature_map.projection"].shape == (16, 6)


BAD_ARGUMENTS = [
    (dict(embed_dim=25), ValueError, "embed_dim"),
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(num_heads=2.0), TypeError, "num_heads"),
    (dict(num_kv_heads=3), ValueError, "num_kv_heads"),
    (dict(feature_map="softmax"), ValueError, "feature_map"),
    (dict(feature_map=3), TypeError, "feature_map"),
    (dict(feature_map=int), TypeError, "feature_map"),
    (dict(feature_map="elu", feature_dim=8), ValueError, "feature_dim"),
    (dict(feature_map=fm.T2R(6, 4), feature_dim=8), ValueError, "feature_dim"),
    (dict(feature_map="t2r", feature_dim=0), ValueError, "feature_dim"),
    (dict(causal=1), TypeError, "causal"),
    (dict(scale="big"), TypeError, "scale"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(eps=None), TypeError, "eps"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(kdim=10), ValueError, "kdim"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_ARGUMENTS, ids=[m + "-" + str(i) for i, (_, _, m) in
                                                                   enumerate(BAD_ARGUMENTS)])
def test_bad_constructor_arguments(kwargs, error, match):
    kwargs = dict(dict(embed_dim=24, num_heads=4), **kwargs)
    with pytest.raises(error, match=match):
        LinearAttention(**kwargs)


def test_bad_call_arguments():
    layer = _layer(feature_map="t2r", feature_dim=5)
    x = _x(2, 5, 24)
    with pytest.raises(ValueError, match="query"):
        layer(x[..., :20])
    with pytest.raises(ValueError, match="query"):
        layer(x[0])
    with pytest.raises(TypeError, match="query"):
        layer(x.tolist())
    with pytest.raises(ValueError, match="key/value inputs need causal=False"):
        layer(x, x)
    with pytest.raises(TypeError, match="return_state"):
        layer(x, return_state=1)
    with pytest.raises(ValueError, match="initial_state"):
        layer(x, state=(torch.zeros(2, 4, 6, 6), torch.zeros(2, 4, 6)))  # feature dim 6, not 5
    with pytest.raises(TypeError, match="initial_state"):
        layer(x, state=torch.zeros(2, 4, 5, 6))
    with pytest.raises(ValueError, match="x must be"):
        layer.step(x)
    with pytest.raises(ValueError, match="step needs a causal layer"):
        _layer(causal=False).step(x[:, 0])
    noncausal = _layer(causal=False)
    with pytest.raises(ValueError, match="key and value"):
        noncausal(x, x[:, :3])
    with pytest.raises(ValueError, match="heads"):
        PerHeadFeatureMap.t2r(3, 6, 4)(torch.zeros(1, 4, 2, 6))
