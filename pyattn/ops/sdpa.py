"""`scaled_dot_product_attention`: a drop-in for `torch.nn.functional.scaled_dot_product_attention`.

Same signature and semantics: inputs ``(N, ..., H, L, E)`` (any number of
batch dims, broadcast between q, k, v), top-left ``is_causal``, bool mask True
= take part, float mask added, ``enable_gqa``. torch's own shape and dtype
checks run first on meta tensors (free), so every input torch rejects is
rejected here with torch's message; the error is a `SDPAInputError`, which is
both the `RuntimeError` torch raises and the `ValueError` pyattn promises.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .softmax import attention


class SDPAInputError(RuntimeError, ValueError):
    """An input `torch.nn.functional.scaled_dot_product_attention` would reject."""


def _torch_checks(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> torch.Size:
    """Run torch's checks on meta copies; returns the output shape."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    devices = {x.device for x in (query, key, value, attn_mask) if x is not None}
    if len(devices) > 1:
        raise SDPAInputError(f"query, key, value and attn_mask must be on one device, got {sorted(map(str, devices))}")
    if not 0.0 <= dropout_p < 1.0:
        raise SDPAInputError(f"dropout_p must be in [0, 1), got {dropout_p}")
    meta = [None if x is None else torch.empty_like(x, device="meta") for x in (query, key, value, attn_mask)]
    try:
        out = F.scaled_dot_product_attention(*meta[:3], attn_mask=meta[3], is_causal=is_causal, scale=scale,
                                             enable_gqa=enable_gqa)
    except (RuntimeError, ValueError, TypeError) as error:
        raise SDPAInputError(str(error)) from error
    return out.shape


def _as_4d(x: torch.Tensor, batch: torch.Size) -> torch.Tensor:
    """(..., H, L, E) -> (prod(batch), H, L, E); a view unless batch dims had to be broadcast and merged."""
    if x.dim() < 3:
        x = x[(None,) * (3 - x.dim())]
    x = x.expand(batch + x.shape[-3:])
    return x.reshape((-1,) + x.shape[-3:]) if len(batch) != 1 else x


def _to_attention_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """torch's arguments -> (q, k, v, keyword arguments of `attention`, output shape)."""
    out_shape = _torch_checks(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    batch = out_shape[:-3]
    q, k, v = (_as_4d(x, batch) for x in (query, key, value))
    seq_q, seq_k = q.shape[2], k.shape[2]
    if is_causal and seq_q != seq_k:
        # torch aligns is_causal top-left; pyattn's causal is bottom-right, equal only when seq_q == seq_k
        attn_mask = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril()
        is_causal = False
    if attn_mask is not None and (len(batch) != 1 or attn_mask.dim() > 4):
        attn_mask = attn_mask.expand(out_shape[:-1] + (seq_k,))
        attn_mask = attn_mask.reshape((-1,) + attn_mask.shape[-3:])
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    kwargs = dict(causal=bool(is_causal), scale=float(scale), attn_bias=attn_mask, dropout_p=float(dropout_p))
    return q, k, v, kwargs, out_shape


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Exactly `torch.nn.functional.scaled_dot_product_attention`, on pyattn's kernels."""
    q, k, v, kwargs, out_shape = _to_attention_args(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                    enable_gqa)
    return attention(q, k, v, **kwargs).reshape(out_shape)
