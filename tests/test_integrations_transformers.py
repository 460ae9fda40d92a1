"""`pyattn.integrations.transformers`: "pyattn" gives the logits, tokens and gradients of "sdpa".

Tiny randomly initialised models built from configs (no downloads): Llama with
GQA (4 query heads, 2 KV heads) and GPT-2, in float32 and float64. A spy on
`pyattn.attention` checks that pyattn really runs, and on which path (the
mask-free causal kernel, or a boolean mask).
"""
import inspect
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config, Gemma2Config, LlamaConfig  # noqa: E402
from transformers import masking_utils  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface  # noqa: E402

from pyattn.integrations import transformers as integration  # noqa: E402
from pyattn.ops import softmax  # noqa: E402
from pyattn.testing import assert_close, assert_close_relative  # noqa: E402
from transformers_compat import cache_kwarg  # noqa: E402

VOCAB, PAD = 97, 0
DTYPES = {"f32": torch.float32, "f64": torch.float64}


@pytest.fixture(scope="module", autouse=True)
def offline_and_registered():
    # The models come from configs; should anything still ask the Hub, it must not go online. Restored after.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        integration.register()
        yield


def _config(name, **overrides):
    # initializer_range 0.2 gives peaked, varied logits (the default 0.02 makes greedy decoding repeat one token)
    if name == "llama":
        kwargs = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64, attention_dropout=0.0)
        config = LlamaConfig
    else:
        kwargs = dict(vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=2, n_positions=64, attn_pdrop=0.0,
                      resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1, eos_token_id=2,
                      scale_attn_by_inverse_layer_idx=True)  # a scale other than 1/sqrt(head_dim)
        config = GPT2Config
    kwargs.update(pad_token_id=PAD, initializer_range=0.2, **overrides)
    return config(**kwargs)


def _model(name, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(name, **overrides), attn_implementation="sdpa")
    return model.to(dtype).eval()


def _set(model, implementation):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:  # transformers < 4.54: submodules share the config
        model.config._attn_implementation = implementation
    assert model.config._attn_implementation == implementation
    return model


def _left_padded_batch():
    """Three prompts of lengths 9, 6 and 3, left-padded to 9."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _labels(ids, mask):
    """Labels whose loss reads no logit of a padding position (the model shifts labels left by one)."""
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:].masked_fill_(mask[:, :-1] == 0, -100)
    return labels


def _builds_masks_with_masking_utils(model):
    """Whether the model asks the mask interface for its mask (older models build their own float masks)."""
    return hasattr(sys.modules[type(model).__module__], "create_causal_mask")


@pytest.fixture
def spy(monkeypatch):
    """Records the path of every `pyattn.attention` call the integration makes."""
    calls, attention = [], softmax.attention

    def recording(q, k, v, **kwargs):
        bias = kwargs.get("attn_bias")
        calls.append(dict(q=q, k=k, causal=kwargs.get("causal"), bias=bias, dropout_p=kwargs.get("dropout_p"),
                          window=kwargs.get("window"), softcap=kwargs.get("softcap")))
        return attention(q, k, v, **kwargs)

    monkeypatch.setattr(softmax, "attention", recording)
    return calls


# --------------------------------------------------------------------------- registration


def test_register_is_idempotent():
    integration.register()
    keys = ALL_ATTENTION_FUNCTIONS.valid_keys()
    integration.register()
    assert ALL_ATTENTION_FUNCTIONS.valid_keys() == keys
    assert keys.count("pyattn") == 1
    assert AttentionInterface._global_mapping["pyattn"] is integration.pyattn_attention_forward
    assert masking_utils.AttentionMaskInterface._global_mapping["pyattn"] is integration.pyattn_mask
    assert ALL_ATTENTION_FUNCTIONS["pyattn"] is integration.pyattn_attention_forward


def test_import_pyattn_does_not_import_transformers():
    code = ("import sys, pyattn; pyattn.integrations.transformers.register; "
            "assert 'transformers' not in sys.modules, 'pyattn imported transformers'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_missing_transformers_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="transformers >= 4.53"):
        integration.register()


def test_old_transformers_raises_import_error(monkeypatch):
    # the module register() will import now: transformers' lazy loading may have replaced the
    # one this file imported in sys.modules
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.52.4")
    with pytest.raises(ImportError, match="found 4.52.4"):
        integration.register()


@pytest.mark.parametrize("route", ["from_pretrained", "config", "from_config"])
def test_every_way_of_choosing_pyattn_runs_it(route, tmp_path, spy):
    model = _model("llama")
    if route == "from_pretrained":
        model.save_pretrained(tmp_path)
        chosen = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="pyattn")
    elif route == "config":
        config = _config("llama")
        config._attn_implementation = "pyattn"
        torch.manual_seed(0)
        chosen = type(model)(config)
    else:
        torch.manual_seed(0)
        chosen = AutoModelForCausalLM.from_config(_config("llama"), attn_implementation="pyattn")
    chosen.eval()
    assert chosen.config._attn_implementation == "pyattn"
    ids, mask = _left_padded_batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        actual = chosen(ids, attention_mask=mask).logits
    assert len(spy) == 2  # one call per layer
    keep = mask.bool()
    assert_close(actual[keep], expected[keep], torch.float32, name="logits")


# --------------------------------------------------------------------------- logits


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_logits_match_sdpa_with_left_padding(name, dtype, spy):
    model = _model(name, dtype)
    ids, mask = _left_padded_batch()
    with torch.no_grad():
        expected = _set(model, "sdpa")(ids, attention_mask=mask).logits
        assert not spy
        actual = _set(model, "pyattn")(ids, attention_mask=mask).logits
    assert len(spy) == model.config.num_hidden_layers
    kv_heads = 2 if name == "llama" else 4
    for call in spy:  # padding needs the mask; GQA heads pass through unrepeated
        assert call["bias"] is not None and not call["causal"]
        assert call["bias"].dtype == torch.bool or not _builds_masks_with_masking_utils(model)
        assert call["q"].shape[1] == 4 and call["k"].shape[1] == kv_heads
    assert torch.isfinite(actual).all(), "padding rows (no visible key) must not give NaN"
    keep = mask.bool()  # padding positions are excluded: sdpa and pyattn may differ on rows that see nothing
    assert_close(actual[keep], expected[keep], dtype, name="logits")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_no_padding_takes_the_mask_free_causal_path(name, spy):
    model = _model(name)
    if not _builds_masks_with_masking_utils(model):
        pytest.skip(f"{type(model).__name__} builds its own masks in transformers {transformers.__version__}")
    ids, _ = _left_padded_batch()
    ones = torch.ones_like(ids)
    with torch.no_grad():
        expected = _set(model, "sdpa")(ids).logits
        _set(model, "pyattn")
        for actual in (model(ids).logits, model(ids, attention_mask=ones).logits):
            assert_close(actual, expected, torch.float32, name="logits")
    assert len(spy) == 2 * model.config.num_hidden_layers
    assert all(call["causal"] and call["bias"] is None for call in spy)


def test_chunked_prefill_with_a_cache_is_bottom_right_causal(spy):
    model = _set(_model("llama"), "pyattn")
    ids, _ = _left_padded_batch()
    with torch.no_grad():
        expected = model(ids).logits
        cache = DynamicCache()
        first = model(ids[:, :4], **cache_kwarg(model, cache), use_cache=True).logits
        spy.clear()
        second = model(ids[:, 4:], **cache_kwarg(model, cache), use_cache=True).logits
    # 5 new queries over 9 keys, no mask: only bottom-right alignment makes this right
    assert all(call["causal"] and call["bias"] is None and call["k"].shape[2] == 9 for call in spy)
    assert_close(torch.cat([first, second], 1), expected, torch.float32, name="logits")


def _mask_kwargs(q_length, kv_length, q_offset, attention_mask=None, mask_function=None):
    """The mask interface's arguments, as this transformers version names them."""
    kwargs = dict(batch_size=2, kv_length=kv_length, kv_offset=0, attention_mask=attention_mask,
                  mask_function=mask_function or masking_utils.causal_mask_function, allow_is_causal_skip=True)
    if "q_length" in inspect.signature(masking_utils.sdpa_mask).parameters:
        kwargs.update(q_length=q_length, q_offset=q_offset)
    else:
        kwargs.update(cache_position=torch.arange(q_offset, q_offset + q_length))
    return kwargs


@pytest.mark.parametrize("case", [
    # (q_length, kv_length, q_offset, padded, mask_function, expect None)
    (7, 7, 0, False, None, True),     # prefill
    (1, 8, 7, False, None, True),     # decoding step, dynamic cache
    (3, 8, 5, False, None, True),     # chunked prefill
    (7, 7, 0, True, None, False),     # left padding
    (1, 8, 7, True, None, False),     # decoding with padding
    (7, 12, 0, False, None, False),   # static cache prefill: unwritten slots after the last query
    (1, 12, 7, False, None, False),   # static cache decoding
    (7, 7, 0, False, "sliding", False),
], ids=["prefill", "decode", "chunk", "pad-prefill", "pad-decode", "static-prefill", "static-decode", "sliding"])
def test_mask_is_none_exactly_when_bottom_right_causal(case):
    q_length, kv_length, q_offset, padded, mask_function, expect_none = case
    padding = torch.ones(2, kv_length, dtype=torch.bool)
    if padded:
        padding[1, :2] = False
    if mask_function == "sliding":
        mask_function = masking_utils.sliding_window_causal_mask_function(3)
    kwargs = _mask_kwargs(q_length, kv_length, q_offset, padding, mask_function)
    mask = integration.pyattn_mask(**kwargs)
    expected = masking_utils.sdpa_mask(**{**kwargs, "allow_is_causal_skip": False})
    if expect_none:
        assert mask is None
        # ... and the mask it stands for is pyattn's causal=True (bottom-right)
        i, j = torch.arange(q_length)[:, None], torch.arange(kv_length)[None, :]
        assert torch.equal(expected.expand(2, 1, q_length, kv_length),
                           (j <= i + kv_length - q_length).expand(2, 1, q_length, kv_length))
    else:
        assert torch.equal(mask, expected)


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name,cache", [("llama", "dynamic"), ("llama", "static"), ("gpt2", "dynamic")])
def test_greedy_generate_matches_sdpa(name, cache, spy):
    model = _model(name)
    ids, mask = _left_padded_batch()
    options = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    if cache == "static":
        options["cache_implementation"] = "static"
    expected = _set(model, "sdpa").generate(ids, **options)
    actual = _set(model, "pyattn").generate(ids, **options)
    assert len(spy) == 8 * model.config.num_hidden_layers  # prefill + 7 decoding steps, every layer
    assert any(call["q"].shape[2] == 1 for call in spy)
    assert len(set(expected[:, 9:].flatten().tolist())) > 3, "degenerate model: the comparison would prove little"
    assert torch.equal(actual, expected)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_training_step_gradients_match_sdpa(name, dtype):
    model = _model(name, dtype).train()
    ids, mask = _left_padded_batch()
    labels = _labels(ids, mask)
    grads, losses = {}, {}
    for implementation in ("sdpa", "pyattn"):
        _set(model, implementation).zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses[implementation] = loss.detach()
        grads[implementation] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_close(losses["pyattn"], losses["sdpa"], dtype, name="loss")
    assert grads["pyattn"].keys() == grads["sdpa"].keys() and grads["sdpa"]
    for n, g in grads["sdpa"].items():
        assert torch.isfinite(grads["pyattn"][n]).all(), n
        assert_close(grads["pyattn"][n], g, dtype, name=f"grad {n}")


def test_dropout_only_while_training(spy):
    model = _set(_model("llama", attention_dropout=0.5), "pyattn")
    ids, _ = _left_padded_batch()
    with torch.no_grad():
        model.train()
        torch.manual_seed(5)
        a = model(ids).logits
        torch.manual_seed(5)
        b = model(ids).logits
        torch.manual_seed(6)
        c = model(ids).logits
        assert {call["dropout_p"] for call in spy} == {0.5}
        spy.clear()
        model.eval()
        d = model(ids).logits
        assert {call["dropout_p"] for call in spy} == {0.0}
        expected = _set(model, "sdpa")(ids).logits
    assert torch.equal(a, b), "dropout must follow torch.manual_seed"
    assert not torch.allclose(a, c) and not torch.allclose(a, d)
    assert_close(d, expected, torch.float32, name="eval logits")


# --------------------------------------------------------------------------- model features


def test_softcap_and_sliding_window_match_eager(spy):
    """Gemma-2: logit softcapping (sdpa cannot) and sliding-window layers, against "eager"."""
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64,
                          pad_token_id=PAD, sliding_window=4, attn_logit_softcapping=5.0,
                          final_logit_softcapping=None, initializer_range=0.2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids, mask = _left_padded_batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        actual = _set(model, "pyattn")(ids, attention_mask=mask).logits
    assert {call["softcap"] for call in spy} == {5.0}
    keep = mask.bool()
    assert torch.isfinite(actual).all()
    assert_close(actual[keep], expected[keep], torch.float32, name="logits")


class _Layer(torch.nn.Module):
    """What attention functions read from a transformers attention layer."""
    is_causal = True
    num_key_value_groups = 2


def _qkv(seed=0, batch=2, heads=4, kv_heads=2, seq_q=6, seq_k=6, dim=8):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, seq_q, dim, generator=gen),
            torch.randn(batch, kv_heads, seq_k, dim, generator=gen),
            torch.randn(batch, kv_heads, seq_k, dim, generator=gen))


def _torch_sdpa(q, k, v, mask):
    """Plain SDPA with repeated KV heads, output in transformers' (B, S, H, D) layout."""
    rep = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
    return out.transpose(1, 2)


def test_sliding_window_without_a_mask():
    q, k, v = _qkv(seq_q=3, seq_k=8)
    i, j = torch.arange(3)[:, None] + 5, torch.arange(8)[None, :]  # bottom-right: query i sits at key i + 5
    expected = _torch_sdpa(q, k, v, (j <= i) & (j > i - 3))
    actual, weights = integration.pyattn_attention_forward(_Layer().eval(), q, k, v, None, sliding_window=3)
    assert weights is None and actual.is_contiguous()
    assert_close(actual, expected, torch.float32, name="out")


def test_position_bias_joins_the_mask():
    q, k, v = _qkv(1)
    bias = torch.randn(1, 4, 6, 6)
    keep = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(2)) > 0.3
    keep[..., 0] = True  # every row sees a key
    expected = _torch_sdpa(q, k, v, bias.masked_fill(~keep, float("-inf")))
    actual, _ = integration.pyattn_attention_forward(_Layer().eval(), q, k, v, keep, position_bias=bias)
    assert_close(actual, expected, torch.float32, name="out")
    if "position_bias" in inspect.signature(sdpa_attention_forward).parameters:
        reference, _ = sdpa_attention_forward(_Layer().eval(), q, k, v, keep, position_bias=bias)
        assert_close(actual, reference, torch.float32, name="out vs transformers sdpa")


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = _qkv(3)
    keep = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keep[0, :, :2] = False  # two rows of batch 0 see nothing
    out, _ = integration.pyattn_attention_forward(_Layer().eval(), q, k, v, keep)
    assert torch.isfinite(out).all() and torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))


def test_unsupported_features_are_reported():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="s_aux"):
        integration.pyattn_attention_forward(_Layer(), q, k, v, None, s_aux=torch.zeros(4))
    with pytest.warns(UserWarning, match="attention weights"):
        integration.pyattn_attention_forward(_Layer(), q, k, v, None, output_attentions=True)


def test_autocast_runs_in_the_autocast_dtype_like_sdpa(spy):
    model = _model("llama")
    ids, mask = _left_padded_batch()
    with torch.no_grad():
        reference = _model("llama", torch.float64)(ids, attention_mask=mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            baseline = _set(model, "sdpa")(ids, attention_mask=mask).logits
            actual = _set(model, "pyattn")(ids, attention_mask=mask).logits
    assert {call["q"].dtype for call in spy} == {torch.bfloat16}
    keep = mask.bool()
    # bf16 rounding through two layers: pyattn's error is bounded by twice sdpa's, both against float64
    assert_close_relative(actual[keep], reference[keep], baseline[keep], name="logits")
