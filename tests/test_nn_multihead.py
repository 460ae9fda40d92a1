"""`pyattn.nn.MultiheadAttention` and `replace_attention` against `torch.nn.MultiheadAttention`.

Each case builds torch's module and pyattn's with one state dict and compares
outputs, attention weights and the gradients of inputs, float masks and
parameters, in float64 so the two agree to rounding.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import pyattn
from pyattn.nn import MultiheadAttention, replace_attention

E, HEADS, B, L, S = 16, 4, 2, 5, 7
F64 = torch.float64

# (kind, kdim/vdim): self-attention passes one tensor as query, key and value (torch's packed projection)
KINDS = {"self": None, "cross": None, "cross-kvdim12": 12}
EXTRAS = {"plain": {}, "nobias": {"bias": False}, "biaskv": {"add_bias_kv": True},
          "biaskv+zeroattn+nobias": {"add_bias_kv": True, "add_zero_attn": True, "bias": False}}
MASKS = ["none", "kpm-bool", "kpm-float", "am2-bool", "am3-float", "am2-float+kpm-float", "am3-bool+kpm-bool"]
WEIGHTS = {"noweights": {"need_weights": False}, "avgweights": {"need_weights": True},
           "headweights": {"need_weights": True, "average_attn_weights": False}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: one thread, so a busy machine's thread-pool stalls do not dominate the runtime."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _modules(kind="cross", extras=(), batch_first=False, heads=HEADS, dtype=F64, **kwargs):
    """torch's module and pyattn's, holding one state dict."""
    kw = {"kdim": KINDS[kind], "vdim": KINDS[kind], "batch_first": batch_first, "dtype": dtype, **dict(extras),
          **kwargs}
    ref = nn.MultiheadAttention(E, heads, **kw)
    with torch.no_grad():  # torch zero-initialises the biases: make them count
        for p in ref.parameters():
            p.normal_(0, 0.3)
    mod = MultiheadAttention(E, heads, **kw)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


def _inputs(kind="cross", batch_first=False, unbatched=False, tgt=L, src=S, batch=B, dtype=F64):
    """query, key, value; one tensor for all three in self-attention."""
    def make(seq, dim):
        shape = (seq, dim) if unbatched else ((batch, seq, dim) if batch_first else (seq, batch, dim))
        return torch.randn(shape, dtype=dtype)
    if kind == "self":
        x = make(tgt, E)
        return x, x, x
    dim = KINDS[kind] or E
    return make(tgt, E), make(src, dim), make(src, dim)


def _masks(name, src, unbatched=False, batch=B, heads=HEADS, tgt=L):
    """key_padding_mask and attn_mask; key 0 always stays visible, so no row is fully masked."""
    nb = 1 if unbatched else batch
    kpm = am = None
    if "kpm-bool" in name:
        kpm = torch.rand(nb, src) < 0.4
        kpm[:, 0] = False
    elif "kpm-float" in name:
        kpm = torch.randn(nb, src, dtype=F64).requires_grad_()
    if kpm is not None and unbatched:
        kpm = kpm[0]
    shape = (tgt, src) if "am2" in name else (nb * heads, tgt, src)
    if "am" in name and "bool" in name:
        am = torch.rand(shape) < 0.4
        am[..., 0] = False
    elif "am" in name:
        am = torch.randn(shape, dtype=F64).requires_grad_()
    return kpm, am


def _leaves(inputs, kpm, am):
    """Fresh leaf copies of the inputs, keeping `query is key is value` for self-attention."""
    q, k, v = inputs
    fresh = {id(x): x.detach().clone().requires_grad_() for x in (q, k, v)}
    def leaf(m):
        return m.detach().clone().requires_grad_() if m is not None and m.is_floating_point() else m
    return (fresh[id(q)], fresh[id(k)], fresh[id(v)]), leaf(kpm), leaf(am)


def _run(module, inputs, kpm, am, **kwargs):
    """Forward and backward of a fixed random projection of the outputs; returns outputs and gradients."""
    (q, k, v), kpm, am = _leaves(inputs, kpm, am)
    out, weights = module(q, k, v, key_padding_mask=kpm, attn_mask=am, **kwargs)
    gen = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, generator=gen, dtype=weights.dtype)).sum()
    module.zero_grad()
    loss.backward()
    grads = {f"grad {n}": x.grad for n, x in (("query", q), ("key", k), ("value", v), ("kpm", kpm),
                                                ("attn_mask", am)) if x is not None and x.requires_grad}
    grads.update({f"grad {n}": p.grad for n, p in module.named_parameters()})
    return {"out": out, "weights": weights, **grads}


def _assert_same(got, want, **tol):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], equal_nan=True, msg=lambda m: f"{name}: {m}", **tol)


@pytest.mark.parametrize("weights", WEIGHTS, ids=list(WEIGHTS))
@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("extras", EXTRAS, ids=list(EXTRAS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["seqfirst", "batchfirst"])
def test_matches_torch(batch_first, kind, extras, masks, weights):
    torch.manual_seed(0)
    ref, mod = _modules(kind, EXTRAS[extras].items(), batch_first)
    inputs = _inputs(kind, batch_first, src=L if kind == "self" else S)
    kpm, am = _masks(masks, inputs[1].shape[1 if batch_first else 0])
    _assert_same(_run(mod, inputs, kpm, am, **WEIGHTS[weights]), _run(ref, inputs, kpm, am, **WEIGHTS[weights]))


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask")
@pytest.mark.parametrize("weights", WEIGHTS, ids=list(WEIGHTS))
@pytest.mark.parametrize("masks", ["none", "kpm-bool", "am3-float", "am2-bool+kpm-float"])
@pytest.mark.parametrize("extras", ["plain", "biaskv+zeroattn+nobias"])
@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_matches_torch(kind, extras, masks, weights):
    torch.manual_seed(0)
    ref, mod = _modules(kind, EXTRAS[extras].items(), batch_first=True)  # ignored for unbatched input
    inputs = _inputs(kind, unbatched=True, src=L if kind == "self" else S)
    kpm, am = _masks(masks, inputs[1].shape[0], unbatched=True)
    _assert_same(_run(mod, inputs, kpm, am, **WEIGHTS[weights]), _run(ref, inputs, kpm, am, **WEIGHTS[weights]))


def _causal_mask(tgt, src, kind):
    """torch's top-left causal mask: float (0 / -inf, as generate_square_subsequent_mask) or bool (True = hidden)."""
    hidden = torch.ones(tgt, src, dtype=torch.bool).triu(1)
    return hidden if kind == "bool" else torch.zeros(tgt, src, dtype=F64).masked_fill(hidden, float("-inf"))


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask")
@pytest.mark.parametrize("need_weights", [False, True], ids=["noweights", "weights"])
@pytest.mark.parametrize("kpm", [False, True], ids=["nokpm", "kpm"])
@pytest.mark.parametrize("mask_kind", ["float", "bool"])
@pytest.mark.parametrize("extras", ["plain", "biaskv", "biaskv+zeroattn+nobias"])
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_is_causal_matches_torch(kind, extras, mask_kind, kpm, need_weights):
    """torch's is_causal hint: with neither padding mask nor weights, SDPA's top-left causal mask replaces attn_mask."""
    torch.manual_seed(0)
    ref, mod = _modules(kind, EXTRAS[extras].items())
    src = L if kind == "self" else S
    inputs = _inputs(kind, src=src)
    padding, _ = _masks("kpm-bool" if kpm else "none", src)
    am = _causal_mask(L, src, mask_kind)
    kw = dict(is_causal=True, need_weights=need_weights)
    _assert_same(_run(mod, inputs, padding, am, **kw), _run(ref, inputs, padding, am, **kw))


def test_is_causal_hint_is_trusted_like_torch():
    """With the hint and no padding mask, torch ignores attn_mask altogether; so must we."""
    torch.manual_seed(0)
    ref, mod = _modules("self")
    x = _inputs("self")[0]
    nothing_hidden = torch.zeros(L, L, dtype=torch.bool)
    with torch.no_grad():
        hinted = mod(x, x, x, attn_mask=nothing_hidden, is_causal=True, need_weights=False)[0]
        plain = mod(x, x, x, attn_mask=nothing_hidden, need_weights=False)[0]
        torch.testing.assert_close(hinted, ref(x, x, x, attn_mask=nothing_hidden, is_causal=True,
                                               need_weights=False)[0])
    assert not torch.allclose(hinted, plain)


def test_need_weights_false_runs_on_pyattn(monkeypatch):
    """The attention runs on pyattn.attention, never on torch's functional MHA."""
    calls = []
    attention = pyattn.nn.multihead.attention
    monkeypatch.setattr(pyattn.nn.multihead, "attention", lambda *a, **k: calls.append(k) or attention(*a, **k))
    monkeypatch.setattr(torch.nn.functional, "multi_head_attention_forward", None)
    monkeypatch.setattr(torch, "_native_multi_head_attention", None)
    _, mod = _modules("self", batch_first=True)
    x = _inputs("self", batch_first=True)[0]
    mod.eval()
    with torch.no_grad():  # the conditions of torch's fused inference path
        mod(x, x, x, need_weights=False)
        mod(x, x, x, attn_mask=_causal_mask(L, L, "float"), is_causal=True, need_weights=False)
    assert [c["causal"] for c in calls] == [False, True]


@pytest.mark.parametrize("need_weights", [False, True], ids=["noweights", "weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fully_masked_rows_like_torch(dtype, need_weights):
    """A batch item whose keys are all padding: zeros from SDPA (need_weights=False), NaN from softmax (True)."""
    torch.manual_seed(0)
    ref, mod = _modules("cross", dtype=dtype)
    inputs = _inputs("cross", dtype=dtype)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1] = True
    with torch.no_grad():
        got, want = mod(*inputs, key_padding_mask=kpm, need_weights=need_weights), ref(
            *inputs, key_padding_mask=kpm, need_weights=need_weights)
    assert got[0][:, 1].isnan().all() == need_weights
    torch.testing.assert_close(got[0], want[0], equal_nan=True)
    if need_weights:
        torch.testing.assert_close(got[1], want[1], equal_nan=True)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("masks", MASKS + ["causal"])
def test_float32_matches_torch(masks, grad):
    """float32 runs on pyattn's default backend for it (a compiled kernel where one is built), not the reference."""
    torch.manual_seed(0)
    ref, mod = _modules("cross", dtype=torch.float32)
    inputs = _inputs("cross", dtype=torch.float32)
    kpm, am = _masks(masks, S)
    kpm, am = (m.float() if m is not None and m.is_floating_point() else m for m in (kpm, am))
    kw = dict(need_weights=False)
    if masks == "causal":
        am, kw["is_causal"] = _causal_mask(L, S, "float").float(), True
    if grad:
        _assert_same(_run(mod, inputs, kpm, am, **kw), _run(ref, inputs, kpm, am, **kw), atol=1e-5, rtol=1e-4)
    else:
        with torch.no_grad():
            torch.testing.assert_close(mod(*inputs, key_padding_mask=kpm, attn_mask=am, **kw)[0],
                                       ref(*inputs, key_padding_mask=kpm, attn_mask=am, **kw)[0])


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    _, mod = _modules("self", batch_first=True, dtype=torch.float32)
    x = _inputs("self", batch_first=True, dtype=torch.float32)[0]
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, 3:] = True
    kw = {"key_padding_mask": kpm, "attn_mask": _causal_mask(L, L, "bool"), "need_weights": False}
    torch.testing.assert_close(torch.compile(mod, fullgraph=True)(x, x, x, **kw)[0], mod(x, x, x, **kw)[0])


@pytest.mark.parametrize("shape", ["tgt0", "src0", "batch0"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["noweights", "weights"])
def test_empty_like_torch(shape, need_weights):
    ref, mod = _modules("cross")
    sizes = dict(tgt0=dict(tgt=0), src0=dict(src=0), batch0=dict(batch=0))[shape]
    inputs = _inputs("cross", **sizes)
    got, want = mod(*inputs, need_weights=need_weights), ref(*inputs, need_weights=need_weights)
    torch.testing.assert_close(got[0], want[0])
    if need_weights:
        torch.testing.assert_close(got[1], want[1])


# ---- dropout ------------------------------------------------------------------------------------------------


def _dropout_modules(p, batch_first=False, dtype=F64):
    return _modules("self", dropout=p, batch_first=batch_first, dtype=dtype)


# float64 runs on the reference backend, float32 on the default one for it (a compiled kernel where one is built)
DTYPES = pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])


@DTYPES
def test_dropout_follows_manual_seed(dtype):
    _, mod = _dropout_modules(0.3, dtype=dtype)
    x = _inputs("self", dtype=dtype)[0]
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(mod(x, x, x, need_weights=False)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.allclose(outs[0], outs[2])


def test_dropout_zero_in_training_equals_eval():
    ref, mod = _dropout_modules(0.0)
    inputs = _inputs("self")
    for kw in WEIGHTS.values():
        train = _run(mod.train(), inputs, None, None, **kw)
        _assert_same(_run(mod.eval(), inputs, None, None, **kw), train)
        _assert_same(_run(ref.train(), inputs, None, None, **kw), train)


def test_dropout_in_eval_is_off():
    ref, mod = _dropout_modules(0.5)
    inputs = _inputs("self")
    _assert_same(_run(mod.eval(), inputs, None, None, need_weights=False),
                 _run(ref.eval(), inputs, None, None, need_weights=False))


def test_dropout_with_weights_equals_torch_under_one_seed():
    """need_weights=True runs torch's math, so it draws torch's very dropout mask."""
    ref, mod = _dropout_modules(0.4)
    inputs = _inputs("self")
    torch.manual_seed(3)
    want = _run(ref, inputs, None, None, average_attn_weights=False)
    torch.manual_seed(3)
    _assert_same(_run(mod, inputs, None, None, average_attn_weights=False), want)
    assert (want["weights"] == 0).any()


@DTYPES
def test_dropout_statistics_match_torch(dtype):
    """Same distribution as torch's dropout (different draws): mean = the eval output, and the same spread."""
    torch.manual_seed(0)
    ref, mod = _dropout_modules(0.5, batch_first=True, dtype=dtype)
    x = torch.randn(1, L, E, dtype=dtype).expand(4000, L, E)  # every batch item draws its own mask
    with torch.no_grad():
        expected = mod.eval()(x[:1], x[:1], x[:1], need_weights=False)[0][0]
        ours = mod.train()(x, x, x, need_weights=False)[0]
        theirs = ref.train()(x, x, x, need_weights=False)[0]
    stderr = ours.std(0) / ours.shape[0] ** 0.5
    assert ((ours.mean(0) - expected).abs() < 5 * stderr + 1e-5).all()
    ratio = ours.std(0) / theirs.std(0)
    assert ((ratio > 0.9) & (ratio < 1.1)).all(), ratio


@pytest.mark.parametrize("need_weights", [False, True], ids=["noweights", "weights"])
def test_dropout_one_like_torch(need_weights):
    """dropout=1 drops every weight: the output is out_proj's bias, as in torch."""
    ref, mod = _dropout_modules(1.0)
    inputs = _inputs("self")
    got, want = mod(*inputs, need_weights=need_weights)[0], ref(*inputs, need_weights=need_weights)[0]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, mod.out_proj.bias.expand_as(got))


# ---- errors -------------------------------------------------------------------------------------------------


def _q(*shape, dtype=F64):
    return torch.randn(shape, dtype=dtype)


# (name, module kwargs, call arguments); every call is wrong somehow
BAD_CALLS = {
    "query-4d": ({}, lambda: (_q(1, L, B, E), _q(S, B, E), _q(S, B, E)), {}),
    "key-2d-for-3d-query": ({}, lambda: (_q(L, B, E), _q(S, E), _q(S, E)), {}),
    "query-1d": ({}, lambda: (_q(E), _q(E), _q(E)), {}),
    "embed-dim": ({}, lambda: (_q(L, B, E + 1), _q(S, B, E + 1), _q(S, B, E + 1)), {}),
    "key-value-shapes": ({}, lambda: (_q(L, B, E), _q(S, B, E), _q(S + 1, B, E)), {}),
    "kdim": ({"kdim": 12, "vdim": 12}, lambda: (_q(L, B, E), _q(S, B, 11), _q(S, B, 12)), {}),
    "kv-seq-for-kdim": ({"kdim": 12, "vdim": 10}, lambda: (_q(L, B, E), _q(S, B, 12), _q(S + 1, B, 10)), {}),
    "batch-sizes": ({}, lambda: (_q(L, B, E), _q(S, B + 1, E), _q(S, B + 1, E)), {}),
    "kpm-dims": ({}, lambda: (_q(L, B, E), _q(S, B, E), _q(S, B, E)),
                 {"key_padding_mask": torch.zeros(B, 1, S, dtype=torch.bool)}),
    "kpm-shape": ({}, lambda: (_q(L, B, E), _q(S, B, E), _q(S, B, E)),
                  {"key_padding_mask": torch.zeros(B, S + 1, dtype=torch.bool)}),
    "kpm-unbatched-dims": ({}, lambda: (_q(L, E), _q(S, E), _q(S, E)),
                           {"key_padding_mask": torch.zeros(1, S, dtype=torch.bool)}),
    "kpm-int": ({}, lambda: (_q(L, B, E), _q(S, B, E), _q(S, B, E)),
                {"key_padding_mask": torch.zeros(B, S, dtype=torch.int64)}),
    "am-int": ({}, lambda: (_q(L, B, E), _q(S, B, E), _q(S, B, E)),
               {"attn_mask": torch.zeros(L, S, dtype=torch.int32)}),
    "am-4d": ({}, lambda: (_q(L, B, E), _q(S, B, E), _q(S, B, E)),
              {"attn_mask": torch.zeros(1, B * HEADS, L, S, dtype=torch.bool)}),
    "am2-shape": ({}, lambda: (_q(L, B, E), _q(S, B, E), _q(S, B, E)),
                  {"attn_mask": torch.zeros(L, S + 1, dtype=torch.bool)}),
    "am3-shape": ({}, lambda: (_q(L, B, E), _q(S, B, E), _q(S, B, E)),
                  {"attn_mask": torch.zeros(B, L, S, dtype=torch.bool)}),
    "am3-unbatched-shape": ({}, lambda: (_q(L, E), _q(S, E), _q(S, E)),
                            {"attn_mask": torch.zeros(B * HEADS, L, S, dtype=torch.bool)}),
    "am-float-dtype": ({}, lambda: (_q(L, B, E), _q(S, B, E), _q(S, B, E)),
                       {"attn_mask": torch.zeros(L, S, dtype=torch.float16)}),
    "kpm-float-dtype": ({}, lambda: (_q(L, B, E), _q(S, B, E), _q(S, B, E)),
                        {"key_padding_mask": torch.zeros(B, S, dtype=torch.bfloat16)}),
    "is-causal-without-mask": ({}, lambda: (_q(L, B, E), _q(S, B, E), _q(S, B, E)), {"is_causal": True}),
    "dropout-above-one": ({"dropout": 1.5}, lambda: (_q(L, B, E), _q(S, B, E), _q(S, B, E)), {}),
    "nested": ({"batch_first": True}, lambda: (torch.nested.nested_tensor([_q(L, E), _q(S, E)]),) * 3, {}),
}


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("need_weights", [False, True], ids=["noweights", "weights"])
@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_inputs_raise_like_torch(case, need_weights):
    module_kw, inputs, call_kw = BAD_CALLS[case]
    ref, mod = _modules(extras=module_kw.items())
    inputs = inputs()
    with pytest.raises(Exception) as want:
        ref(*inputs, need_weights=need_weights, **call_kw)
    with pytest.raises(want.type) as got:
        mod(*inputs, need_weights=need_weights, **call_kw)
    if case != "nested":  # ours explains the way out of the NestedTensor path instead
        assert str(got.value) == str(want.value)


@pytest.mark.parametrize("need_weights", [False, True], ids=["noweights", "weights"])
def test_float32_masks_with_float64_query_like_torch(need_weights):
    """torch's SDPA takes a float32 mask for any query dtype; its need_weights=True math does not."""
    torch.manual_seed(0)
    ref, mod = _modules()
    inputs = _inputs()
    kpm, am = torch.randn(B, S), torch.randn(B * HEADS, L, S)
    if need_weights:
        with pytest.raises(RuntimeError):
            ref(*inputs, key_padding_mask=kpm, attn_mask=am)
        with pytest.raises(RuntimeError):
            mod(*inputs, key_padding_mask=kpm, attn_mask=am)
    else:
        _assert_same(_run(mod, inputs, kpm, am, need_weights=False), _run(ref, inputs, kpm, am, need_weights=False))


def test_mismatched_mask_types_warn_like_torch():
    ref, mod = _modules()
    inputs = _inputs()
    kpm, am = torch.zeros(B, S, dtype=torch.bool), torch.zeros(L, S, dtype=F64)
    for module in (ref, mod):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module(*inputs, key_padding_mask=kpm, attn_mask=am)
        messages = [str(w.message) for w in caught if "mismatched" in str(w.message)]
        if module is ref:
            want = messages
    assert messages == want and len(want) > 0


def test_constructor_errors_like_torch():
    for args in ((0, 2), (16, 0), (16, 3)):
        with pytest.raises(Exception) as want:
            nn.MultiheadAttention(*args)
        with pytest.raises(want.type, match=str(want.value)):
            MultiheadAttention(*args)


# ---- conversion, state dict ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["self", "cross-kvdim12"])
def test_state_dict_round_trip(kind):
    ref, mod = _modules(kind, {"add_bias_kv": True}.items())
    assert list(mod.state_dict()) == list(ref.state_dict())
    names = set(ref.state_dict())
    assert ({"in_proj_weight"} if kind == "self" else {"q_proj_weight", "k_proj_weight", "v_proj_weight"}) <= names
    back = nn.MultiheadAttention(E, HEADS, kdim=KINDS[kind], vdim=KINDS[kind], add_bias_kv=True, dtype=F64)
    back.load_state_dict(mod.state_dict())
    inputs = _inputs(kind, src=L if kind == "self" else S)
    _assert_same(_run(back, inputs, None, None), _run(ref, inputs, None, None))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_from_torch(training):
    ref = nn.MultiheadAttention(E, HEADS, dropout=0.25, bias=False, add_bias_kv=True, add_zero_attn=True, kdim=12,
                                vdim=10, batch_first=True, dtype=F64).train(training)
    mod = MultiheadAttention.from_torch(ref)
    assert type(mod) is MultiheadAttention and mod.training == training
    for attr in ("embed_dim", "num_heads", "dropout", "add_zero_attn", "kdim", "vdim", "batch_first", "head_dim",
                 "_qkv_same_embed_dim"):
        assert getattr(mod, attr) == getattr(ref, attr), attr
    assert list(mod.state_dict()) == list(ref.state_dict())
    for (name, p), (ref_name, ref_p) in zip(mod.named_parameters(), ref.named_parameters()):
        assert name == ref_name and p is ref_p  # shared, so an optimizer over ref's parameters still trains mod
    assert all(p.dtype == F64 and p.device.type == "cpu" for p in mod.parameters())
    q, k, v = _q(B, L, E), _q(B, S, 12), _q(B, S, 10)
    torch.manual_seed(0)
    want = ref(q, k, v)
    torch.manual_seed(0)
    _assert_same(dict(zip("ow", mod(q, k, v))), dict(zip("ow", want)))
    with pytest.raises(TypeError):
        MultiheadAttention.from_torch(nn.Linear(2, 2))


class _MyAttention(nn.MultiheadAttention):
    pass


def test_replace_attention_swaps_every_torch_module():
    shared = nn.MultiheadAttention(E, 2)
    mine = MultiheadAttention(E, 2)
    model = nn.Sequential(nn.Linear(E, E), nn.ModuleDict({"a": nn.MultiheadAttention(E, 2, batch_first=True),
                                                          "b": shared}),
                          nn.ModuleList([shared, mine, _MyAttention(E, 2)]),
                          nn.TransformerDecoderLayer(E, 2, dim_feedforward=8))
    keys = list(model.state_dict())
    assert replace_attention(model) is model
    assert type(model[1]["a"]) is MultiheadAttention and model[1]["a"].batch_first
    assert model[1]["b"] is model[2][0] and type(model[2][0]) is MultiheadAttention  # sharing kept
    assert model[2][1] is mine  # already pyattn's
    assert type(model[2][2]) is _MyAttention  # a subclass may have its own forward: left alone
    assert type(model[3].self_attn) is MultiheadAttention and type(model[3].multihead_attn) is MultiheadAttention
    assert list(model.state_dict()) == keys
    assert type(replace_attention(nn.MultiheadAttention(E, 2))) is MultiheadAttention


def _encoder(batch_first, norm_first=False, dropout=0.0):
    layer = nn.TransformerEncoderLayer(E, 2, dim_feedforward=32, dropout=dropout, batch_first=batch_first,
                                       norm_first=norm_first, dtype=F64)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first and not norm_first)


_CAUSAL = nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
ENCODER_CALLS = {  # padding is left-aligned, as torch's NestedTensor path wants
    "plain": {},
    "padding": {"src_key_padding_mask": torch.tensor([[False] * L, [False] * 3 + [True] * (L - 3)])},
    "causal": {"mask": _CAUSAL, "is_causal": True},
    "causal+padding": {"mask": _CAUSAL.isinf(),  # bool, as the padding mask: no mismatched-types warning
                       "src_key_padding_mask": torch.tensor([[False] * L, [False] * 4 + [True]])},
}


@pytest.mark.parametrize("call", ENCODER_CALLS)
@pytest.mark.parametrize("mode", ["train", "eval", "eval-nograd"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batchfirst", "seqfirst"])
def test_replace_attention_in_transformer_encoder(batch_first, mode, call, monkeypatch):
    """Same outputs and gradients as the original, and pyattn runs even where torch has a fused inference path.

    In eval mode without autograd, torch's own encoder takes that path, whose
    NestedTensors leave zeros at padded query positions (with autograd they are
    not zero); only the positions that are not padding are compared then.
    """
    torch.manual_seed(0)
    ref = _encoder(batch_first).train(mode == "train")
    model = replace_attention(copy.deepcopy(ref))
    assert model.use_nested_tensor is False
    calls = []
    attention = pyattn.nn.multihead.attention
    monkeypatch.setattr(pyattn.nn.multihead, "attention", lambda *a, **k: calls.append(1) or attention(*a, **k))
    x = torch.randn((B, L, E) if batch_first else (L, B, E), dtype=F64)
    kwargs = ENCODER_CALLS[call]
    if mode == "eval-nograd":
        with torch.no_grad():
            got, want = model(x, **kwargs), ref(x, **kwargs)
        keep = ~kwargs.get("src_key_padding_mask", torch.zeros(B, L, dtype=torch.bool))
        keep = keep if batch_first else keep.T
        torch.testing.assert_close(got[keep], want[keep])
    else:
        got, want = _encoder_grads(model, x, kwargs), _encoder_grads(ref, x, kwargs)
        assert got.keys() == want.keys()
        _assert_same(got, want)
    assert len(calls) == 2  # one per layer


def _encoder_grads(model, x, kwargs):
    x = x.detach().clone().requires_grad_()
    out = model(x, **kwargs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype))
    return {"out": out, "grad x": x.grad, **{n: p.grad for n, p in model.named_parameters()}}


def test_replaced_encoder_layer_alone_runs_on_pyattn(monkeypatch):
    """TransformerEncoderLayer's fused inference path would read self_attn's weights without calling it."""
    torch.manual_seed(0)
    ref = _encoder(batch_first=True).layers[0].eval()
    layer = replace_attention(copy.deepcopy(ref))
    calls = []
    attention = pyattn.nn.multihead.attention
    monkeypatch.setattr(pyattn.nn.multihead, "attention", lambda *a, **k: calls.append(1) or attention(*a, **k))
    x = _q(B, L, E)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x))
    assert calls == [1]


def test_replaced_encoder_trains():
    """A few optimizer steps on the original's parameters train the replaced model identically."""
    torch.manual_seed(0)
    ref = _encoder(batch_first=True)
    start = copy.deepcopy(ref)
    model = replace_attention(copy.deepcopy(ref))
    x, target = _q(B, L, E), _q(B, L, E)
    for m in (ref, model):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            ((m(x) - target) ** 2).mean().backward()
            opt.step()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, msg=name)
    assert not torch.equal(model.layers[0].self_attn.in_proj_weight, start.layers[0].self_attn.in_proj_weight)
