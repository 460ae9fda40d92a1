"""Hugging Face transformers integration: the ``"pyattn"`` attention implementation.

``register()`` adds two functions to transformers' global registries:

* ``pyattn_attention_forward`` to ``AttentionInterface``: the attention of every
  layer, in the signature of ``transformers.integrations.sdpa_attention.sdpa_attention_forward``;
* ``pyattn_mask`` to ``AttentionMaskInterface``: the mask the model builds once
  per forward and hands to every layer.

after which ``from_pretrained(..., attn_implementation="pyattn")``,
``model.set_attn_implementation("pyattn")`` and a config with
``_attn_implementation="pyattn"`` run attention on ``pyattn.attention`` and give
the logits of ``"sdpa"``.

The mask is where the speed is. pyattn's ``causal=True`` is aligned
bottom-right (query ``i`` sees key ``j`` iff ``j <= i + Sk - Sq``), so it is
exactly transformers' causal mask whenever there is no padding and the last
query is the last key: prefill, decoding and chunked prefill with a dynamic
cache. ``pyattn_mask`` returns ``None`` then, and the layers run the mask-free
causal kernel with the KV heads passed through as they are (GQA is native).
Any other mask (padding, sliding windows, chunked or packed sequences, static
caches, bidirectional layers with padding) is transformers' own boolean SDPA
mask (True = attend), which pyattn takes as ``attn_bias``. A query row that
sees no key (a left-padding position) gives zeros, never NaN.

``convert_to_linear(model, feature_dim=...)`` turns a decoder-only model's
softmax attention into T2R linear attention (Kasai et al. 2021), ready to
finetune and decoding with a fixed-size recurrent state; it lives in
``pyattn.integrations._transformers_linear`` (``LinearAttentionCache`` and the
attention/mask functions are re-exported here).

transformers is imported when ``register()`` or ``convert_to_linear()`` is
called (or a linear-attention class is looked up), never at import time.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Dict, Optional, Tuple

import torch

from ..ops import softmax

NAME = "pyattn"
MIN_TRANSFORMERS = "4.53"  # the first release with `AttentionMaskInterface` (transformers.masking_utils)
MIN_TRANSFORMERS_LINEAR = "5.0"  # convert_to_linear: Cache made of CacheLayerMixin layers (tested with 5.23)

__all__ = ["register", "pyattn_attention_forward", "pyattn_mask", "NAME", "convert_to_linear", "LinearAttentionCache"]


# --------------------------------------------------------------------------- attention


def pyattn_attention_forward(module: Optional[torch.nn.Module], query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                             **kwargs: Any) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function interface, on ``pyattn.attention``.

    query ``(B, Hq, Sq, D)``, key ``(B, Hkv, Sk, D)``, value ``(B, Hkv, Sk, Dv)``
    (``Hq % Hkv == 0``; the KV heads are not repeated). ``attention_mask``: the
    layer's mask from ``pyattn_mask`` (``None``, or bool ``(B, 1, Sq, Sk)``,
    True = attend) or any additive float / bool mask broadcastable to
    ``(B, Hq, Sq, Sk)``. Returns ``(out (B, Sq, Hq, Dv), None)``: attention
    weights are never materialized.

    With no mask the layer is causal (bottom-right) unless ``is_causal`` or
    ``module.is_causal`` says otherwise; with a mask the mask alone decides.
    Keyword arguments models pass: ``softcap`` (Gemma-2 style logit capping),
    ``sliding_window`` (applied only when there is no mask, as flash-attention
    applies it: ``window=(w - 1, w - 1)``; a mask already holds the window),
    ``position_bias`` (an additive bias, T5 style, combined with the mask).
    Dropout runs only while ``module.training``, as in transformers' eager path.
    """
    if kwargs.get("output_attentions") or kwargs.get("head_mask") is not None:
        warnings.warn("the 'pyattn' attention implementation returns no attention weights and supports no "
                      "`head_mask`; use attn_implementation='eager' for them", stacklevel=2)
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("the 'pyattn' attention implementation does not support attention sinks "
                                  "(`s_aux`); use attn_implementation='eager' for this model")
    query, key, value = _autocast(query, key, value)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    seq_k = key.shape[-2]

    window = (-1, -1)
    bias = attention_mask
    if bias is None:
        causal = bool(is_causal)
        sliding_window = kwargs.get("sliding_window")
        if sliding_window is not None and sliding_window > 0 and seq_k > sliding_window:
            window = (sliding_window - 1, sliding_window - 1)
    else:
        causal = False
        if bias.dim() == 4 and bias.shape[-1] > seq_k:
            # older models build static-cache masks longer than the keys given (transformers < 5 sdpa slices too)
            bias = bias[..., :seq_k]
        bias = _bias_dtype(bias, query.dtype)

    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        bias = _with_position_bias(position_bias, bias, query.dtype)

    training = True if module is None else module.training
    out = softmax.attention(query, key, value, causal=causal, scale=scaling, window=window,
                            softcap=float(kwargs.get("softcap") or 0.0), attn_bias=bias,
                            dropout_p=float(dropout or 0.0) if training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def _autocast(query, key, value):
    """Under autocast, transformers' SDPA call runs in the autocast dtype (rotary embeddings often leave
    q, k in float32 and v in the low dtype); pyattn's op is not an autocast op, so cast here."""
    device_type = query.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # a device type autocast does not know
        return query, key, value
    if not enabled or not query.is_floating_point():
        return query, key, value
    dtype = torch.get_autocast_dtype(device_type)
    # autocast leaves float64 alone
    return tuple(x.to(dtype) if x.is_floating_point() and x.dtype != torch.float64 else x
                 for x in (query, key, value))


def _bias_dtype(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """pyattn takes bool masks and float biases in q's dtype (or float32 below float64)."""
    if bias.dtype == torch.bool or bias.dtype == dtype or (bias.dtype == torch.float32 and dtype != torch.float64):
        return bias
    if not bias.is_floating_point():  # an integer 0/1 mask: 1 = attend
        return bias.bool()
    return bias.to(dtype)


def _with_position_bias(position_bias: torch.Tensor, mask: Optional[torch.Tensor], dtype: torch.dtype):
    """One additive bias from a float position bias and the mask (sdpa's `create_position_bias_mask`), with
    -inf where the mask forbids, so a row that sees nothing stays zeros."""
    position_bias = _bias_dtype(position_bias, dtype)
    if mask is None:
        return position_bias
    if mask.dtype == torch.bool:
        return position_bias.masked_fill(~mask, float("-inf"))
    return position_bias + mask.to(position_bias.dtype)


# --------------------------------------------------------------------------- mask


def pyattn_mask(*args: Any, **kwargs: Any) -> Optional[torch.Tensor]:
    """transformers' mask-function interface (the arguments of ``masking_utils.sdpa_mask``).

    Returns ``None`` when the mask asked for is exactly pyattn's bottom-right
    causal mask: the plain causal pattern, no padding inside the keys used, and
    the last query at the position of the last key. Otherwise returns
    transformers' SDPA mask, bool ``(B, 1, Sq, Sk)``, True = attend, always
    materialized for causal patterns (SDPA's own ``None`` means top-left
    alignment, which is not pyattn's), or ``None`` for a bidirectional layer
    without padding.
    """
    from transformers import masking_utils

    builder = masking_utils.sdpa_mask
    params = _named_arguments(builder, args, kwargs)
    if _is_bottom_right_causal(params, masking_utils.causal_mask_function):
        return None
    params["allow_is_causal_skip"] = False
    return builder(**params)


def _named_arguments(fn, args, kwargs) -> Dict[str, Any]:
    """The call's arguments by name, as `fn` (sdpa_mask of this transformers version) names them."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(fn).bind(*args, **kwargs)
    named = dict(bound.arguments)
    named.update(named.pop("kwargs", {}))
    return named


def _is_bottom_right_causal(params: Dict[str, Any], causal_mask_function) -> bool:
    """Whether the mask `params` describe is pyattn's `causal=True` with no further masking."""
    if params.get("mask_function", causal_mask_function) is not causal_mask_function:
        return False  # sliding window, chunked, packed, bidirectional, or a custom pattern
    if not params.get("allow_is_causal_skip", True) or _is_exporting():
        return False
    kv_length, kv_offset = params.get("kv_length"), params.get("kv_offset", 0)
    if "q_length" in params:  # transformers >= 5
        q_length, q_offset = params["q_length"], params.get("q_offset", 0)
    elif params.get("cache_position") is not None:  # transformers 4.x: the absolute query positions
        positions = params["cache_position"]
        q_length = positions.shape[0]
        if q_length == 0:
            return False
        if _is_compiling():
            return False  # reading the positions would break the graph
        q_offset = int(positions[-1]) + 1 - q_length
    else:
        return False
    if kv_length is None or (_is_compiling() and any(isinstance(x, torch.Tensor) for x in (q_offset, kv_offset))):
        return False
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    # causal_mask_function: key position <= query position. Aligned bottom-right iff the last query sits at the
    # last key; a static cache (unwritten slots after the last query) fails this and gets a mask.
    if q_offset + q_length != kv_offset + kv_length:
        return False
    padding = params.get("attention_mask")
    if padding is None:
        return True
    if _is_compiling() or padding.dim() != 2 or padding.shape[-1] < kv_offset + kv_length:
        return False  # a shorter 2D mask is padded with False by transformers
    return bool(padding[:, kv_offset:kv_offset + kv_length].all())


def _is_compiling() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _is_exporting() -> bool:
    # torch.export bakes the mask choice into the graph; keep the general mask there, as transformers does
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting()) if is_exporting is not None else False


# --------------------------------------------------------------------------- registration


def _require_transformers():
    """transformers' two registries, or an ImportError saying what is missing."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"pyattn.integrations.transformers needs Hugging Face transformers >= {MIN_TRANSFORMERS}"
                          " (pip install transformers)") from error
    version = getattr(transformers, "__version__", "unknown")
    too_old = _older_than(version, MIN_TRANSFORMERS)  # if unknown, the imports below decide
    try:
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface
    except ImportError as error:
        too_old, cause = True, error
    else:
        cause = None
    if too_old:
        raise ImportError(f"pyattn.integrations.transformers needs transformers >= {MIN_TRANSFORMERS} "
                          f"(AttentionInterface and AttentionMaskInterface); found {version}") from cause
    return AttentionInterface, AttentionMaskInterface


def _older_than(version: str, minimum: str) -> bool:
    """Whether `version` is known to be older than `minimum` (False without packaging or for a local build)."""
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # transformers depends on packaging: hardly ever
        return False
    try:
        return Version(version).release < Version(minimum).release
    except InvalidVersion:
        return False


def register() -> None:
    """Register ``"pyattn"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

    Global for the process and idempotent: calling it again changes nothing.
    Raises ImportError when transformers is missing or older than 4.53.
    """
    attention_interface, mask_interface = _require_transformers()
    attention_interface.register(NAME, pyattn_attention_forward)
    mask_interface.register(NAME, pyattn_mask)


# --------------------------------------------------------------------------- linear attention (T2R)

_LINEAR_EXPORTS = ("LinearAttentionCache", "RecurrentStateLayer", "linear_attention_forward", "linear_attention_mask",
                   "recurrent_state_nbytes", "LINEAR_NAME")


def convert_to_linear(model, feature_dim: int = 32, *, eps: float = 1e-6):
    """Swap a Hugging Face causal LM's softmax attention for T2R linear attention, in place (Kasai et al. 2021).

    Keeps every pretrained weight (q/k/v/o projections, RoPE) and adds a
    learned ``relu(x W^T + b)`` feature map with ``feature_dim`` features per
    layer and key/value head; ``generate`` then decodes with a constant-size
    recurrent state per layer. Padding masks are handled; sliding windows
    and packed sequences raise. Returns `model`. Details:
    ``pyattn.integrations._transformers_linear``.
    """
    _require_transformers_for_linear()
    from . import _transformers_linear

    return _transformers_linear.convert_to_linear(model, feature_dim, eps=eps)


def _require_transformers_for_linear() -> None:
    """ImportError unless transformers >= 5 (its cache layers, which the recurrent state plugs into)."""
    _require_transformers()
    import transformers

    version = getattr(transformers, "__version__", "unknown")
    if _older_than(version, MIN_TRANSFORMERS_LINEAR):
        raise ImportError(f"convert_to_linear needs transformers >= {MIN_TRANSFORMERS_LINEAR} (its Cache layers); "
                          f"found {version}")


def __getattr__(name):
    # the cache classes subclass transformers' own: import transformers only when one is asked for
    if name in _LINEAR_EXPORTS:
        _require_transformers_for_linear()
        from . import _transformers_linear

        return getattr(_transformers_linear, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
