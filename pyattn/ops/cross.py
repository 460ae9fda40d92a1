"""Cross-attention of few queries (latents) over many keys: `cross_attention`.

Non-causal ``out = softmax(scale * q k^T, masked) v`` where batch item ``b``
uses keys ``j < kv_lengths[b]`` that ``key_padding_mask[b, j]`` does not mark
as padding. q may be broadcast over the batch (batch stride 0, as from
``latents.expand(B, ...)``); its gradient then sums over the batch.
"""
from __future__ import annotations

import torch

from .. import dispatch, validation
from ._common import needs_grad, stat_dtype
from ._custom_op import DifferentiableOp

_INT_DTYPES = (torch.int32, torch.int64)


def _fake_cross_attention(q, k, v, **params):
    return (q.new_empty(q.shape[:-1] + (v.shape[-1],)),
            q.new_empty(q.shape[:-1], dtype=stat_dtype(q.dtype)))


def _check_kv_lengths(q, k, v, *, kv_lengths, **params):
    if kv_lengths is not None:
        seq_k = k.shape[2]
        validation.int_values_in("kv_lengths", kv_lengths, 0, seq_k, f"key counts between 0 and seq_k={seq_k}")


_CROSS_ATTENTION = DifferentiableOp(
    "cross_attention", ("q", "k", "v"),
    [("kv_lengths", "Tensor?"), ("key_padding_mask", "Tensor?"), ("scale", "float")], 2, _fake_cross_attention,
    _check_kv_lengths)


def _plan_cross_attention(q, k, v, *, kv_lengths=None, key_padding_mask=None, scale=None, return_lse=False,
                          backend=None):
    _, _, d, dv = validation.qkv(q, k, v)
    batch, seq_k = k.shape[0], k.shape[2]
    validation.flag("return_lse", return_lse)
    features = set()
    if kv_lengths is not None:
        validation.tensor("kv_lengths", kv_lengths, ndim=1, dtypes=_INT_DTYPES)
        if kv_lengths.shape[0] != batch or kv_lengths.device != q.device:
            raise ValueError(f"kv_lengths must have shape ({batch},) on {q.device}, "
                             f"got shape {tuple(kv_lengths.shape)} on {kv_lengths.device}")
        features.add("kv_lengths")
    if key_padding_mask is not None:
        validation.tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
        if tuple(key_padding_mask.shape) != (batch, seq_k) or key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must have shape ({batch}, {seq_k}) (batch, seq_k) on {q.device}, "
                             f"got shape {tuple(key_padding_mask.shape)} on {key_padding_mask.device}")
        features.add("key_padding_mask")
    request = dispatch.Request("cross_attention", q.device, q.dtype, needs_grad(q, k, v), frozenset(features),
                               d, dv)
    return dispatch.choose(request, backend), dict(scale=validation.scale(scale, d))


def cross_attention(q, k, v, *, kv_lengths=None, key_padding_mask=None, scale=None, return_lse=False,
                    backend=None):
    """Perceiver-style cross-attention (module docstring).

    q ``(B, Hq, Sq, D)`` (``Sq`` small; may be ``latents.expand(B, ...)``),
    k ``(B, Hkv, Sk, D)``, v ``(B, Hkv, Sk, Dv)``; ``kv_lengths`` int ``(B,)``;
    ``key_padding_mask`` bool ``(B, Sk)``, True = padding. A query that sees
    no key outputs zeros (lse ``-inf``). Returns out (and lse).
    """
    plan, params = _plan_cross_attention(q, k, v, kv_lengths=kv_lengths, key_padding_mask=key_padding_mask,
                                         scale=scale, return_lse=return_lse, backend=backend)
    out, lse = _CROSS_ATTENTION(q, k, v, backend=plan.backend, kv_lengths=kv_lengths,
                                key_padding_mask=key_padding_mask, **params)
    return (out, lse) if return_lse else out
