"""`convert_to_linear`: a Hugging Face causal LM turned into a linear-recurrent one (T2R, Kasai et al. 2021).

Imported by `pyattn.integrations.transformers` only when a linear function is
used, since it imports transformers (its classes subclass transformers' cache).

How a converted model runs
--------------------------
* Every self-attention module (GPT-2's ``GPT2Attention``, Llama's
  ``LlamaAttention``, and any module of the same shape: an ``...Attention``
  class with ``layer_idx`` and ``head_dim`` (or ``head_size``) in a model that
  calls transformers' ``AttentionInterface``; tried with transformers 5.23:
  GPT-2, Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, OPT, GPT-NeoX; with 5.25
  GPT-J too) keeps its
  code and every pretrained weight: the q/k/v/o projections, RoPE, biases.
  It gains ``feature_map``, a
  `pyattn.nn.PerHeadFeatureMap` of learned T2R maps ``relu(x W^T + b)``, one
  per key/value head, shared by the keys of that head and the queries that
  read it.
* The model's attention implementation becomes ``"pyattn_linear"``
  (`linear_attention_forward`): softmax ``(q k^T)`` is replaced by
  ``phi(q) . phi(k)`` normalised, i.e. ``pyattn.linear_attention`` with
  ``normalize=True`` (causal). The pretrained softmax scale is not used: the
  normalisation cancels any scale, and T2R learns its own.
* The cache: the attention module reads the layer's recurrent state
  ``(S, z)`` (float32, ``(B, H, F, head_dim)`` and ``(B, H, F)``) from the
  ``past_key_values`` it is given, continues from it and writes the new state
  back. `RecurrentStateLayer`, the cache layer holding it, also counts the
  tokens seen, so ``get_seq_length`` (and with it position ids, RoPE and
  ``cache_position``) stays right, but it never stores keys or values: memory
  per layer is fixed and each decoded token costs the same whatever the
  context. The model's own ``DynamicCache`` (what ``generate`` and
  ``use_cache=True`` create) works: its empty layers are replaced by
  `RecurrentStateLayer` on first use. `LinearAttentionCache` is the same thing
  built directly.

Masks: padding only
-------------------
The mask function for ``"pyattn_linear"`` turns transformers' 2D padding mask
into a ``(B, S_new)`` keep-mask of the new tokens; padded tokens get zero key
features, so they add nothing to the state (left padding, right padding, or
padding anywhere: exact key-padding semantics). Outputs at padded positions
are zeros. Sliding windows, chunked attention, packed sequences (several
documents in one row, detected from ``position_ids``), custom 4D masks and
bidirectional layers have no linear-recurrent equivalent here and raise.
A cache whose layer already holds keys and values (from a softmax model)
raises; the still-empty layers of a ``StaticCache`` are replaced like those
of a ``DynamicCache`` (the recurrent state is of fixed size anyway). Beam
search reorders the states. A recurrent state cannot be cropped, so assisted
(speculative) decoding is not supported. Attention dropout does not apply (no
attention probabilities are formed).
"""
from __future__ import annotations

import warnings
from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch import nn
from transformers import masking_utils
from transformers.cache_utils import Cache, CacheLayerMixin, EncoderDecoderCache
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from ..nn.linear import PerHeadFeatureMap
from ..ops.linear import linear_attention

LINEAR_NAME = "pyattn_linear"
State = Tuple[torch.Tensor, torch.Tensor]

__all__ = ["convert_to_linear", "LinearAttentionCache", "RecurrentStateLayer", "recurrent_state_nbytes",
           "linear_attention_forward", "linear_attention_mask", "LINEAR_NAME"]


# --------------------------------------------------------------------------- cache


class RecurrentStateLayer(CacheLayerMixin):
    """One layer's linear-attention cache: the recurrent state ``(S, z)`` and the number of tokens seen.

    ``update`` stores no keys or values (it returns the new ones unchanged and
    counts them); the attention function reads and writes ``state``.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False  # nothing to allocate ahead: the state appears with the first tokens

    def __init__(self, **kwargs):
        super().__init__()
        self.state: Optional[State] = None
        self.seen_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.is_initialized = True
        self.seen_tokens += key_states.shape[-2]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes held (the state only)."""
        return 0 if self.state is None else sum(t.numel() * t.element_size() for t in self.state)

    def offload(self):
        if self.state is not None:
            self.state = tuple(t.to("cpu", non_blocking=True) for t in self.state)

    def prefetch(self):
        pass  # the attention function moves the state to the inputs' device when it reads it

    def reset(self) -> None:
        self.state, self.seen_tokens, self.is_initialized = None, 0, False

    def _map_state(self, fn) -> None:
        if self.state is not None:
            self.state = tuple(fn(t) for t in self.state)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_state(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError("a recurrent linear-attention state cannot forget tokens: it cannot be cropped "
                                  "(assisted/speculative decoding needs a croppable cache)")


class LinearAttentionCache(Cache):
    """A cache of `RecurrentStateLayer` (one per layer, made on first use) for a `convert_to_linear` model.

    Pass it as ``cache`` to a forward or to ``generate`` (``past_key_values`` before
    transformers 5.x renamed it; the converted layers find the Cache under either name);
    the model's default ``DynamicCache`` behaves the same once converted.
    """

    def __init__(self):
        super().__init__(layer_class_to_replicate=RecurrentStateLayer)

    def nbytes(self) -> int:
        return recurrent_state_nbytes(self)


def recurrent_state_nbytes(cache: Cache) -> int:
    """Bytes of recurrent state in `cache` (keys and values of softmax layers are not counted)."""
    return sum(layer.nbytes() for layer in cache.layers if isinstance(layer, RecurrentStateLayer))


def _state_layer(cache: Any, layer_idx: int) -> RecurrentStateLayer:
    """The `RecurrentStateLayer` of `layer_idx` in `cache`, replacing a still-empty softmax layer by one."""
    if isinstance(cache, EncoderDecoderCache):
        raise NotImplementedError("convert_to_linear supports decoder-only models; got an EncoderDecoderCache")
    if not isinstance(cache, Cache):
        raise TypeError(f"past_key_values must be a transformers Cache, got {type(cache).__name__}")
    while len(cache.layers) <= layer_idx:
        cache.layers.append(RecurrentStateLayer())
    layer = cache.layers[layer_idx]
    if isinstance(layer, RecurrentStateLayer):
        return layer
    if not (isinstance(layer, CacheLayerMixin) and not layer.is_initialized):
        raise ValueError(f"past_key_values layer {layer_idx} is a {type(layer).__name__} that already holds keys and "
                         "values; a linear-attention model keeps a recurrent state: pass a fresh DynamicCache or "
                         "LinearAttentionCache")
    layer = cache.layers[layer_idx] = RecurrentStateLayer()
    return layer


# --------------------------------------------------------------------------- attention and mask


def linear_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, **kwargs: Any) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function interface, as T2R linear attention on ``pyattn.linear_attention``.

    query ``(B, Hq, S, D)``, key/value ``(B, Hkv, S, D)``: the new tokens only
    (the cache keeps no keys). ``attention_mask``: None, or the bool
    ``(B, S)`` keep-mask of the new tokens from `linear_attention_mask`.
    ``module.feature_map`` maps q and k; the state comes from and returns to
    the layer's `RecurrentStateLayer` when a cache is in use.
    ``dropout`` and ``scaling`` are ignored (module docstring).
    Returns ``(out (B, S, Hq, D), None)``.
    """
    if kwargs.get("output_attentions"):
        warnings.warn("linear attention forms no attention weights; output_attentions gives None", stacklevel=2)
    feature_map = getattr(module, "feature_map", None)
    if not isinstance(feature_map, nn.Module):
        raise RuntimeError(f"{type(module).__name__} has no T2R feature_map: the '{LINEAR_NAME}' attention "
                           "implementation runs only on models converted by convert_to_linear")
    if getattr(module, "is_causal", True) is False:
        raise NotImplementedError(f"'{LINEAR_NAME}' supports causal self-attention only; "
                                  f"{type(module).__name__} is not causal")
    if attention_mask is not None and (attention_mask.dtype != torch.bool or attention_mask.dim() != 2
                                       or tuple(attention_mask.shape) != (query.shape[0], query.shape[2])):
        raise ValueError(f"'{LINEAR_NAME}' takes a 2D padding mask (batch, seq) turned into a keep-mask by its mask "
                         f"function; got a {attention_mask.dim()}D {attention_mask.dtype} mask of shape "
                         f"{tuple(attention_mask.shape)} (custom 4D masks are not supported)")
    from .transformers import _autocast

    query, key, value = _autocast(query, key, value)  # RoPE leaves q, k in float32 under autocast, v in its dtype
    qf, kf = feature_map(query), feature_map(key)
    if attention_mask is not None:
        kf = kf * attention_mask[:, None, :, None].to(kf.dtype)   # padded tokens add nothing to the state
    layer: Optional[RecurrentStateLayer] = getattr(module, "_pyattn_state_layer", None)
    state = None
    if layer is not None and layer.state is not None:
        state = tuple(t.to(query.device) for t in layer.state)
    result = linear_attention(qf, kf, value, causal=True, feature_map="identity", normalize=True,
                              eps=getattr(module, "linear_eps", 1e-6), initial_state=state,
                              output_final_state=layer is not None)
    if layer is not None:
        out, layer.state = result
    else:
        out = result
    return out.transpose(1, 2).contiguous(), None


def linear_attention_mask(*args: Any, **kwargs: Any) -> Optional[torch.Tensor]:
    """transformers' mask-function interface: the keep-mask ``(B, q_length)`` of the new tokens, or None.

    Accepts only the plain causal pattern; anything else raises NotImplementedError.
    """
    from .transformers import _named_arguments

    params = _named_arguments(masking_utils.sdpa_mask, args, kwargs)
    mask_function = params.get("mask_function", masking_utils.causal_mask_function)
    if mask_function is not masking_utils.causal_mask_function:
        name = getattr(mask_function, "__name__", type(mask_function).__name__)
        raise NotImplementedError(
            f"'{LINEAR_NAME}' (linear attention) supports the causal mask with padding only; this forward asks for "
            f"another pattern ({name}: a sliding window, chunks, packed sequences or a custom overlay). For packed "
            "sequences, pass one document per row with an attention_mask instead of position_ids that restart.")
    padding = params.get("attention_mask")
    if padding is None:
        return None
    q_length, q_offset = int(params["q_length"]), int(params.get("q_offset", 0))
    if padding.dim() != 2:
        raise ValueError(f"'{LINEAR_NAME}' takes a 2D attention_mask (batch, tokens), got shape {tuple(padding.shape)}")
    if padding.shape[-1] < q_offset + q_length:
        raise ValueError(f"attention_mask covers {padding.shape[-1]} tokens, but the cache has seen {q_offset} and "
                         f"{q_length} are new: it must cover all {q_offset + q_length}")
    keep = padding[:, q_offset:q_offset + q_length].bool()
    return None if bool(keep.all()) else keep


# --------------------------------------------------------------------------- conversion


def _capture_state(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: hands the layer's recurrent state to the attention function through the module."""
    # models name it past_key_values (most), layer_past (GPT-NeoX), ...: take the Cache passed, by name or position
    cache = kwargs.get("past_key_values")
    if cache is None:
        cache = next((a for a in (*kwargs.values(), *args) if isinstance(a, Cache)), None)
    module._pyattn_state_layer = None if cache is None else _state_layer(cache, module.layer_idx)


def _release_state(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    module._pyattn_state_layer = None  # the cache is the caller's: keep no reference to it


def _head_dim(module: nn.Module) -> Optional[int]:
    for attribute in ("head_dim", "head_size"):  # GPT-NeoX says head_size
        value = getattr(module, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _attention_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """Self-attention modules of transformers' shape: an ``...Attention`` class with ``layer_idx`` and a head dim."""
    for name, module in model.named_modules():
        if (type(module).__name__.endswith("Attention") and isinstance(getattr(module, "layer_idx", None), int)
                and _head_dim(module) is not None):
            yield name, module


def _register() -> None:
    AttentionInterface.register(LINEAR_NAME, linear_attention_forward)
    AttentionMaskInterface.register(LINEAR_NAME, linear_attention_mask)


def convert_to_linear(model: nn.Module, feature_dim: int = 32, *, eps: float = 1e-6) -> nn.Module:
    """Swap the softmax attention of a Hugging Face causal LM for T2R linear attention, in place.

    Kasai et al. 2021, "Finetuning Pretrained Transformers into RNNs": each
    attention layer keeps its pretrained projections (and RoPE) and gains a
    learned feature map ``phi(x) = relu(x W^T + b)``, ``W`` ``(feature_dim, head_dim)``,
    one per layer and key/value head, shared by queries and keys (the paper
    learns one per attention head; with GQA a kv head and the query heads
    that read it share one, so the key features are computed once per kv head),
    so attention becomes ``phi(q_i) . sum_j phi(k_j) v_j^T / (phi(q_i) . sum_j phi(k_j) + eps)``
    over ``j <= i``: a recurrence with a fixed-size state. Finetune the model
    afterwards (every parameter, or at least the new ``feature_map`` ones).

    Works for decoder-only models whose attention modules follow
    transformers' ``AttentionInterface`` (GPT-2, Llama with GQA, and the
    models built like them) in transformers 5.x. ``generate`` then decodes with
    a constant-size state per layer (see the module docstring for the cache
    and for which masks are supported: padding yes, sliding windows and packed
    sequences no). Returns `model`. The new parameters are created on the
    device and in the dtype of each attention module's weights, initialised by
    the current torch generator.
    """
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, int):
        raise TypeError(f"feature_dim must be an int, got {type(feature_dim).__name__}")
    if feature_dim <= 0:
        raise ValueError(f"feature_dim must be positive, got {feature_dim}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel (transformers >= 5), got {type(model).__name__}")
    if not getattr(model, "_supports_attention_backend", False):
        raise NotImplementedError(f"{type(model).__name__} does not run its attention through transformers' "
                                  "AttentionInterface, which convert_to_linear replaces")
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        raise NotImplementedError("convert_to_linear supports decoder-only models (no cross-attention)")
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    num_heads = text_config.num_attention_heads
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads

    modules: List[Tuple[str, nn.Module]] = list(_attention_modules(model))
    if not modules:
        raise ValueError(f"found no attention module in {type(model).__name__} (an '...Attention' class with "
                         "layer_idx and head_dim, as transformers' decoder models have)")
    for name, module in modules:
        if hasattr(module, "feature_map"):
            raise ValueError(f"{name} already has a feature_map: the model is converted already")
        if getattr(module, "is_cross_attention", False) or getattr(module, "is_causal", True) is False:
            raise NotImplementedError(f"{name} is not causal self-attention; convert_to_linear supports decoders only")
    _register()
    for _, module in modules:
        weight = next(module.parameters())
        module.feature_map = PerHeadFeatureMap.t2r(num_kv_heads, _head_dim(module), feature_dim).to(
            device=weight.device, dtype=weight.dtype)
        module.linear_eps = float(eps)
        module._pyattn_state_layer = None
        module.register_forward_pre_hook(_capture_state, with_kwargs=True)
        module.register_forward_hook(_release_state, with_kwargs=True, always_call=True)
    model.set_attn_implementation(LINEAR_NAME)
    return model
