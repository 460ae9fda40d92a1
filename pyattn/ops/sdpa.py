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

from .. import validation
from .softmax import attention


class SDPAInputError(RuntimeError, ValueError):
    """An input `torch.nn.functional.scaled_dot_product_attention` would reject."""


def _meta(x):
    return None if x is None else torch.empty_like(x, device="meta")


def _plain_output_shape(query, key, value, attn_mask, is_causal, scale, enable_gqa):
    """The output shape of the inputs most calls bring, all of which torch's meta and math paths accept; None
    for the rest.

    Plain means: strided 3-D or 4-D q, k, v of one float dtype with equal leading dims, equal
    head counts (or, 4-D with ``enable_gqa``, q's a multiple of k's), matching head and key
    sizes, plain Python flags and scale, no mask with ``is_causal``, and a bool or q-dtype mask
    that broadcasts to the scores without growing them. torch's own checks run on meta copies
    for everything else: they cost ~3 ms a call (torch runs its Python decomposition on meta
    tensors), which a decoding step must not pay. A 0-D or 1-D mask is plain too: torch's math backend
    broadcasts it, and so does pyattn, though torch's CPU backend choice fails on it with an IndexError.
    """
    dims = query.dim()
    if (dims not in (3, 4) or key.dim() != dims or value.dim() != dims or query.dtype not in validation.FLOAT_DTYPES
            or key.dtype != query.dtype or value.dtype != query.dtype
            or any(x.layout != torch.strided for x in (query, key, value))
            or type(is_causal) is not bool or type(enable_gqa) is not bool
            or not (scale is None or type(scale) is float)):
        return None
    q_heads, k_heads = query.shape[-3], key.shape[-3]
    heads_ok = q_heads == k_heads or (enable_gqa and dims == 4 and k_heads > 0 and q_heads % k_heads == 0)
    if (not heads_ok or value.shape[-3] != k_heads or query.shape[:-3] != key.shape[:-3]
            or value.shape[:-3] != key.shape[:-3] or query.shape[-1] != key.shape[-1]
            or value.shape[-2] != key.shape[-2]):
        return None
    if attn_mask is not None:
        scores = query.shape[:-1] + (key.shape[-2],)
        if (is_causal or attn_mask.layout != torch.strided or attn_mask.dtype not in (torch.bool, query.dtype)
                or attn_mask.dim() > dims
                or any(m not in (1, s) for m, s in zip(reversed(attn_mask.shape), reversed(scores)))):
            return None
    return query.shape[:-1] + (value.shape[-1],)


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
    if not 0.0 <= dropout_p <= 1.0:
        raise SDPAInputError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    shape = _plain_output_shape(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    if shape is not None:
        return shape
    q, k, v, mask = (_meta(x) for x in (query, key, value, attn_mask))
    try:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                             enable_gqa=enable_gqa)
        unmasked = F.scaled_dot_product_attention(q, k, v, enable_gqa=enable_gqa) if mask is not None else out
    except (RuntimeError, ValueError) as error:  # torch's TypeErrors pass through as they are
        raise SDPAInputError(str(error)) from error
    if out.shape != unmasked.shape:
        # torch writes into an output shaped by q, k, v: a mask may not make it larger
        raise SDPAInputError(f"output with shape {list(unmasked.shape[:-1]) + [key.shape[-2]]} doesn't match the "
                             f"broadcast shape {list(out.shape[:-1]) + [key.shape[-2]]}")
    return out.shape


def _as_4d(x: torch.Tensor, batch: torch.Size, heads: int) -> torch.Tensor:
    """(..., H, L, E) -> (prod(batch), heads, L, E); H is 1 or `heads`; a view unless batch dims must merge."""
    if x.dim() == 4 and len(batch) == 1 and x.shape[:2] == batch + (heads,):
        return x  # already (B, H, L, E): most calls
    if x.dim() < 3:
        x = x[(None,) * (3 - x.dim())]
    x = x.expand(batch + (heads,) + x.shape[-2:])
    return x.reshape((-1,) + x.shape[-3:]) if len(batch) != 1 else x


def _to_attention_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """torch's arguments -> (q, k, v, keyword arguments of `attention`, output shape)."""
    out_shape = _torch_checks(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    batch, heads = out_shape[:-3], (out_shape[-3] if len(out_shape) >= 3 else 1)
    kv_heads = key.shape[-3] if key.dim() >= 3 else 1
    if not enable_gqa or kv_heads == 1:
        kv_heads = heads  # torch broadcasts a head dim of 1 (of q, k or v) to the others
    q = _as_4d(query, batch, heads)
    k, v = _as_4d(key, batch, kv_heads), _as_4d(value, batch, kv_heads)
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


def _torch_edge_case(query, key, value, dropout_p) -> bool:
    """Inputs pyattn's kernels do not take but torch answers: zero-sized head dims, dropout_p = 1."""
    return query.shape[-1] == 0 or value.shape[-1] == 0 or dropout_p == 1.0 or (
        query.dim() >= 3 and (query.shape[-3] == 0 or key.shape[-3] == 0))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Exactly `torch.nn.functional.scaled_dot_product_attention`, on pyattn's kernels."""
    if _torch_edge_case(query, key, value, dropout_p):
        _torch_checks(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    q, k, v, kwargs, out_shape = _to_attention_args(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                    enable_gqa)
    out = attention(q, k, v, **kwargs)
    return out if out.shape == out_shape else out.reshape(out_shape)
