"""`pyattn.integrations.transformers.convert_to_linear`: T2R linear attention in Hugging Face models.

Tiny randomly initialised GPT-2 and Llama (GQA: 4 query heads, 2 KV heads)
built from configs, nothing downloaded. The converted model must keep every
pretrained weight, give the same logits whether it runs a sequence at once,
in chunks or token by token through its recurrent state, generate greedily
what full recomputation gives, with a state that does not grow, handle
padding exactly, and train.
"""
import importlib.util
import pathlib
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (AutoModelForCausalLM, DynamicCache, GPT2Config, LlamaConfig,  # noqa: E402
                          MistralConfig)

from pyattn.integrations import transformers as integration  # noqa: E402
from pyattn.nn import PerHeadFeatureMap  # noqa: E402
from pyattn.ops import linear as linear_op  # noqa: E402
from pyattn.testing import assert_close  # noqa: E402
from transformers_compat import cache_kwarg  # noqa: E402

VOCAB, PAD = 97, 0
MODELS = ["gpt2", "llama"]
EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "finetune_linear_gpt2.py"


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        # Importing a modeling module makes transformers put a new module object in sys.modules["transformers"]
        # (auto_docstring imports transformers.models); put the one of collection time back afterwards, for
        # tests that patch attributes of the module they imported (test_integrations_transformers' version check).
        mp.setitem(sys.modules, "transformers", sys.modules["transformers"])
        # Tiny models: one thread is fastest, and on a busy machine several threads spinning at every small
        # matmul make each one ~50x slower.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _config(name):
    # initializer_range 0.2: peaked, varied logits, so greedy decoding does not repeat one token
    common = dict(vocab_size=VOCAB, pad_token_id=PAD, initializer_range=0.2)
    if name == "llama":
        return LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                           num_hidden_layers=2, max_position_embeddings=128, **common)
    return GPT2Config(n_embd=64, n_head=4, n_layer=2, n_positions=128, attn_pdrop=0.0, resid_pdrop=0.0,
                      embd_pdrop=0.0, bos_token_id=1, eos_token_id=2, **common)


def _pretrained(name, dtype=torch.float32):
    """A softmax model standing in for a pretrained one."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(name), attn_implementation="sdpa").to(dtype).eval()


def _converted(name, dtype=torch.float32, feature_dim=16):
    model = integration.convert_to_linear(_pretrained(name, dtype), feature_dim=feature_dim)
    with torch.no_grad():  # most relu features active, as after a little finetuning
        for module in model.modules():
            if isinstance(module, PerHeadFeatureMap):
                for t2r in module.maps:
                    t2r.bias.add_(0.3)
    return model


def _ids(batch=2, seq=10, seed=1):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _left_padded():
    """Prompts of 9, 6 and 3 tokens, left-padded to 9, with their position ids (0 at each first real token)."""
    ids = _ids(3, 9)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.fixture
def op_calls(monkeypatch):
    """Records (q, k, initial state given) for each `pyattn.linear_attention` call the conversion makes."""
    from pyattn.integrations import _transformers_linear as module
    calls, op = [], linear_op.linear_attention

    def spy(q, k, v, **kwargs):
        calls.append(dict(q=q.shape, k=k.shape, state=kwargs.get("initial_state") is not None))
        return op(q, k, v, **kwargs)

    monkeypatch.setattr(module, "linear_attention", spy)
    return calls


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("name", MODELS)
def test_conversion_keeps_every_pretrained_weight(name):
    model = _pretrained(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert integration.convert_to_linear(model, feature_dim=12) is model
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    new = sorted(set(after) - set(before))
    assert new and all(".feature_map.maps." in key for key in new)
    kv_heads = 2 if name == "llama" else 4
    maps = [m for m in model.modules() if isinstance(m, PerHeadFeatureMap)]
    assert len(maps) == 2 and all(len(m.maps) == kv_heads for m in maps)       # per layer, per kv head
    assert all(t2r.weight.shape == (12, 16) and t2r.weight.requires_grad for m in maps for t2r in m.maps)
    assert model.config._attn_implementation == integration.LINEAR_NAME
    # the pretrained weights still run: back on sdpa, the softmax logits come back exactly
    ids = _ids()
    with torch.no_grad():
        expected = _pretrained(name)(ids).logits
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(model(ids).logits, expected)


@pytest.mark.parametrize("name", MODELS)
def test_full_forward_equals_chunks_and_tokens_through_the_state(name, op_calls):
    model = _converted(name)
    ids = _ids(seq=9)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        assert not any(call["state"] for call in op_calls)
        cache = integration.LinearAttentionCache()
        steps = [model(ids[:, t:t + 1], **cache_kwarg(model, cache), use_cache=True).logits for t in range(9)]
        assert cache.get_seq_length() == 9
        chunked_cache = DynamicCache()  # the model's own cache type works too
        chunks = [model(ids[:, a:b], **cache_kwarg(model, chunked_cache), use_cache=True).logits
                  for a, b in ((0, 4), (4, 6), (6, 9))]
    assert_close(torch.cat(steps, 1), full, torch.float32, name="token by token")
    assert_close(torch.cat(chunks, 1), full, torch.float32, name="chunked")
    assert all(type(layer).__name__ == "RecurrentStateLayer" for layer in chunked_cache.layers)
    decoding = [call for call in op_calls if call["q"][2] == 1]
    assert len(decoding) == 2 * 9 and all(call["k"][2] == 1 for call in decoding)   # one token, not the context
    assert all(call["state"] for call in decoding[2:])


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generate_with_the_state_equals_full_recompute(name, op_calls):
    model = _converted(name)
    ids, mask = _left_padded()
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
        sequence, sequence_mask = ids, mask
        for _ in range(10):  # no cache: every step recomputes the whole sequence
            logits = model(sequence, attention_mask=sequence_mask, position_ids=_positions(sequence_mask),
                           use_cache=False).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], 1)
            sequence_mask = torch.cat([sequence_mask, torch.ones_like(sequence_mask[:, :1])], 1)
    assert torch.equal(generated, sequence)
    assert len(set(generated[:, 9:].flatten().tolist())) > 3, "degenerate model: the comparison would prove little"
    decoding = [call for call in op_calls if call["q"][2] == 1 and call["state"]]
    assert len(decoding) >= 9 * 2 and all(call["k"][2] == 1 for call in decoding)


def test_generate_matches_across_cache_kinds():
    """The default cache, an explicit LinearAttentionCache, a static cache's layers and beam search all run."""
    model = _converted("llama")
    ids = _ids()
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        expected = model.generate(ids, **options)
        explicit = model.generate(ids, **cache_kwarg(model, integration.LinearAttentionCache()), **options)
        static = model.generate(ids, cache_implementation="static", **options)
        beams = model.generate(ids, num_beams=2, **options)
    assert torch.equal(explicit, expected) and torch.equal(static, expected)
    assert beams.shape == expected.shape


@pytest.mark.parametrize("name", MODELS)
def test_state_memory_does_not_grow_with_tokens(name):
    model = _converted(name)
    ids = _ids()
    sizes = {}
    with torch.no_grad():
        for new_tokens in (2, 12):
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=PAD, return_dict_in_generate=True)
            cache = out.past_key_values
            assert cache.get_seq_length() == 10 + new_tokens - 1  # the last token is sampled, never fed back
            assert all(layer.keys is None for layer in cache.layers)  # no keys or values kept
            sizes[new_tokens] = integration.recurrent_state_nbytes(cache)
    heads, features, head_dim = 4, 16, 16
    per_layer = 4 * 2 * heads * features * (head_dim + 1)   # float32 S and z, batch 2
    assert sizes[2] == sizes[12] == 2 * per_layer


OTHER_CONFIGS = {
    "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=2, **_SMALL),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**_SMALL),   # head_size, and the cache passed as layer_past
    "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4,
                                          num_hidden_layers=2, ffn_dim=96, word_embed_proj_dim=64, pad_token_id=PAD),
}
_SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96,
              pad_token_id=PAD)


@pytest.mark.parametrize("name", OTHER_CONFIGS)
def test_other_decoder_architectures_convert(name):
    torch.manual_seed(0)
    model = integration.convert_to_linear(AutoModelForCausalLM.from_config(OTHER_CONFIGS[name]()).eval(),
                                          feature_dim=8)
    ids = _ids(seq=6)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = integration.LinearAttentionCache()
        steps = torch.cat([model(ids[:, t:t + 1], **cache_kwarg(model, cache), use_cache=True).logits for t in range(6)], 1)
    assert_close(steps, full, torch.float32, name="token by token")


def test_models_without_the_attention_interface_are_rejected():
    # Which architectures run their attention through the interface changes between transformers releases
    # (GPT-J did not up to 5.23 and does in 5.25): a model class that says it does not stands for them all.
    class OwnAttentionLM(transformers.GPT2LMHeadModel):
        _supports_attention_backend = False

    with pytest.raises(NotImplementedError, match="AttentionInterface"):
        integration.convert_to_linear(OwnAttentionLM(_config("gpt2")))


# --------------------------------------------------------------------------- padding and masks


@pytest.mark.parametrize("name", MODELS)
def test_left_padding_is_exact(name):
    """A padded row gives, at its real tokens, the logits of the same prompt run alone."""
    model = _converted(name)
    ids, mask = _left_padded()
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, position_ids=_positions(mask)).logits
        alone = [model(ids[b:b + 1, start:]).logits[0] for b, start in ((0, 0), (1, 3), (2, 6))]
    for b, start in ((0, 0), (1, 3), (2, 6)):
        assert_close(padded[b, start:], alone[b], torch.float32, name=f"row {b}")
    assert torch.isfinite(padded).all()


def test_unsupported_masks_and_caches_are_rejected():
    model = _converted("llama")
    ids = _ids()
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match="padding only"):  # packed sequences: positions restart
            model(ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]] * 2), use_cache=False)
        with pytest.raises(ValueError, match="2D padding mask"):
            model(ids, attention_mask=torch.ones(2, 1, 10, 10, dtype=torch.bool))
        softmax_cache = DynamicCache()
        _pretrained("llama")(ids, **cache_kwarg(model, softmax_cache), use_cache=True)
        with pytest.raises(ValueError, match="already holds keys and values"):
            model(ids, **cache_kwarg(model, softmax_cache), use_cache=True)
        config = MistralConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=96, num_hidden_layers=2, sliding_window=4, pad_token_id=PAD)
        sliding = integration.convert_to_linear(AutoModelForCausalLM.from_config(config).eval(), feature_dim=8)
        with pytest.raises(NotImplementedError, match="sliding window"):
            sliding(ids)
        cache = integration.LinearAttentionCache()
        model(ids, **cache_kwarg(model, cache), use_cache=True)
        with pytest.raises(NotImplementedError, match="cannot be cropped"):
            cache.crop(3)


def test_bad_arguments():
    with pytest.raises(TypeError, match="feature_dim"):
        integration.convert_to_linear(_pretrained("gpt2"), feature_dim=8.0)
    with pytest.raises(ValueError, match="feature_dim"):
        integration.convert_to_linear(_pretrained("gpt2"), feature_dim=0)
    with pytest.raises(ValueError, match="eps"):
        integration.convert_to_linear(_pretrained("gpt2"), eps=-1.0)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        integration.convert_to_linear(torch.nn.Linear(4, 4))
    model = _converted("gpt2")
    with pytest.raises(ValueError, match="converted already"):
        integration.convert_to_linear(model)
    with pytest.raises(NotImplementedError, match="decoder-only"):
        integration.convert_to_linear(AutoModelForCausalLM.from_config(
            GPT2Config(n_embd=32, n_head=2, n_layer=1, vocab_size=VOCAB, add_cross_attention=True)))


def test_transformers_4_is_refused_with_a_clear_error(monkeypatch):
    model = _pretrained("gpt2")  # first: importing a model may replace sys.modules["transformers"] (see offline)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
    with pytest.raises(ImportError, match="transformers >= 5.0.*found 4.57.1"):
        integration.convert_to_linear(model)


def test_unconverted_model_cannot_use_the_linear_implementation():
    model = _converted("gpt2")
    plain = _pretrained("gpt2")
    plain.set_attn_implementation(integration.LINEAR_NAME)  # registered by the conversion above
    with pytest.raises(RuntimeError, match="convert_to_linear"):
        plain(_ids())
    assert model.config._attn_implementation == integration.LINEAR_NAME


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", MODELS)
def test_training_step_reaches_the_feature_maps(name):
    model = _converted(name).train()
    ids, mask = _left_padded()
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(ids, attention_mask=mask, position_ids=_positions(mask), labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, g in grads.items():
        assert g is not None and torch.isfinite(g).all(), n
    t2r = [g for n, g in grads.items() if ".feature_map." in n]
    assert len(t2r) == 2 * 2 * (2 if name == "llama" else 4) and all(g.abs().sum() > 0 for g in t2r)
    projections = [g for n, g in grads.items() if any(p in n for p in ("q_proj", "k_proj", "c_attn"))]
    assert projections and all(g.abs().sum() > 0 for g in projections)


def test_autocast_runs_in_the_low_dtype():
    """Under autocast RoPE leaves q, k in float32 and v in bfloat16: the layer casts them as transformers' sdpa does."""
    model = _converted("llama")
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model(ids).logits
    assert torch.isfinite(actual).all()
    assert (actual.float() - expected).abs().max() < 0.1 * expected.abs().max()


def test_save_and_reload_a_converted_model(tmp_path):
    """The recipe: save, load the softmax model, convert it again, load the saved state dict (T2R weights too)."""
    model = _converted("gpt2")
    model.save_pretrained(tmp_path)
    state = model.state_dict()
    reloaded = integration.convert_to_linear(AutoModelForCausalLM.from_pretrained(tmp_path), feature_dim=16)
    reloaded.load_state_dict(state)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, model(ids).logits)


# --------------------------------------------------------------------------- imports and the example


def test_import_pyattn_does_not_import_transformers():
    code = ("import sys, pyattn; pyattn.integrations.transformers.convert_to_linear; "
            "assert 'transformers' not in sys.modules, 'pyattn imported transformers'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_finetune_example_lowers_the_loss(capsys):
    spec = importlib.util.spec_from_file_location("finetune_linear_gpt2", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--pretrain-steps", "0", "--steps", "15", "--batch-size", "4", "--seq-len", "32",
                           "--sample-tokens", "8"])
    losses = result["finetune"]
    assert len(losses) == 15 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < 0.8 * losses[0], losses
    printed = capsys.readouterr().out
    assert "linear   step    0" in printed and "recurrent state:" in printed
