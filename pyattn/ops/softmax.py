"""Fused softmax attention: `attention`, `attention_varlen`, `scaled_dot_product_attention`.

Masks, bottom-right aligned (``seq_q=3, seq_k=5``; ``x`` = seen)::

    causal=True           window=(1, 0)        window=(1, 1), causal=False
    x x x . .             . . x . .            . x x x .
    x x x x .             . . x x .            . . x x x
    x x x x x             . . . x x            . . . x x

Query ``i`` sees key ``j`` iff ``j <= i + seq_k - seq_q`` (causal) and
``i + seq_k - seq_q - left <= j <= i + seq_k - seq_q + right`` (window).
"""
from __future__ import annotations

from .. import dispatch, validation
from ._common import dropout_seed, needs_grad, stat_dtype
from ._custom_op import DifferentiableOp

_PARAMS = [("dropout_seed", "Tensor?"), ("causal", "bool"), ("scale", "float"), ("window_left", "int"),
           ("window_right", "int"), ("softcap", "float"), ("dropout_p", "float")]


def _fake_attention(q, k, v, attn_bias, **params):
    return (q.new_empty(q.shape[:-1] + (v.shape[-1],)),
            q.new_empty(q.shape[:-1], dtype=stat_dtype(q.dtype)))


def _fake_attention_varlen(q, k, v, **params):
    return (q.new_empty(q.shape[:-1] + (v.shape[-1],)),
            q.new_empty((q.shape[1], q.shape[0]), dtype=stat_dtype(q.dtype)))


_ATTENTION = DifferentiableOp("attention", ("q", "k", "v", "attn_bias"), _PARAMS, 2, _fake_attention)


def _check_varlen_values(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **params):
    validation.cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    validation.cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")


_ATTENTION_VARLEN = DifferentiableOp(
    "attention_varlen", ("q", "k", "v"),
    [("cu_seqlens_q", "Tensor?"), ("cu_seqlens_k", "Tensor?"), ("max_seqlen_q", "int"),
     ("max_seqlen_k", "int")] + _PARAMS, 2, _fake_attention_varlen, _check_varlen_values)


def _common_params(causal, scale, window, softcap, dropout_p, return_lse, head_dim):
    """Checks the arguments the softmax ops share; returns the op params and the features used."""
    causal = validation.flag("causal", causal)
    validation.flag("return_lse", return_lse)
    left, right = validation.window(window)
    params = dict(causal=causal, scale=validation.scale(scale, head_dim), window_left=left, window_right=right,
                  softcap=validation.nonnegative_float("softcap", softcap),
                  dropout_p=validation.nonnegative_float("dropout_p", dropout_p, below=1.0))
    features = {name for name, used in (("causal", causal), ("window", (left, right) != (-1, -1)),
                                        ("softcap", params["softcap"] > 0),
                                        ("dropout", params["dropout_p"] > 0)) if used}
    return params, features


def _plan_attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0, attn_bias=None,
                    dropout_p=0.0, return_lse=False, backend=None):
    _, _, d, dv = validation.qkv(q, k, v)
    params, features = _common_params(causal, scale, window, softcap, dropout_p, return_lse, d)
    if attn_bias is not None:
        validation.attn_bias(attn_bias, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), q.dtype, q.device)
        attn_bias = attn_bias[(None,) * (4 - attn_bias.dim())]  # a view: kernels see 4 dims, size 1 = broadcast
        features.add("attn_bias")
    request = dispatch.Request("attention", q.device, q.dtype, needs_grad(q, k, v, attn_bias),
                               frozenset(features), d, dv,
                               (q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2]))
    return dispatch.choose(request, backend), attn_bias, params


def attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0, attn_bias=None,
              dropout_p=0.0, return_lse=False, backend=None):
    """Softmax attention ``out = softmax(scale * q k^T [softcapped] + bias, masked) v``.

    q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)``, v ``(B, Hkv, Sk, Dv)``, any strides;
    ``Hq % Hkv == 0`` (query head ``h`` uses kv head ``h // (Hq // Hkv)``).
    Returns out ``(B, Hq, Sq, Dv)`` in q's dtype, and with ``return_lse`` the
    float32 log-sum-exp ``(B, Hq, Sq)`` of the scores (``-inf`` for a row that
    sees no key; its output is zero). See the module docstring for the masks,
    ``shared/API.md`` section 1 for the full contract.
    """
    plan, bias, params = _plan_attention(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
                                         attn_bias=attn_bias, dropout_p=dropout_p, return_lse=return_lse,
                                         backend=backend)
    out, lse = _ATTENTION(q, k, v, bias, backend=plan.backend, dropout_seed=dropout_seed(params["dropout_p"]),
                          **params)
    return (out, lse) if return_lse else out


def _plan_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                           scale=None, window=(-1, -1), softcap=0.0, dropout_p=0.0, return_lse=False,
                           backend=None):
    _, _, d, dv = validation.qkv(q, k, v, layout="thd")
    validation.cu_seqlens("cu_seqlens_q", cu_seqlens_q, max_seqlen_q, "max_seqlen_q", q.device)
    validation.cu_seqlens("cu_seqlens_k", cu_seqlens_k, max_seqlen_k, "max_seqlen_k", q.device)
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(f"cu_seqlens_k must have the length of cu_seqlens_q (batch + 1 = {cu_seqlens_q.shape[0]}),"
                         f" got {cu_seqlens_k.shape[0]}")
    params, features = _common_params(causal, scale, window, softcap, dropout_p, return_lse, d)
    request = dispatch.Request("attention_varlen", q.device, q.dtype, needs_grad(q, k, v), frozenset(features),
                               d, dv)
    return dispatch.choose(request, backend), params


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, scale=None,
                     window=(-1, -1), softcap=0.0, dropout_p=0.0, return_lse=False, backend=None):
    """`attention` over a packed ragged batch.

    q ``(total_q, Hq, D)``, k ``(total_k, Hkv, D)``, v ``(total_k, Hkv, Dv)``;
    ``cu_seqlens_*`` int32 ``(batch + 1,)`` prefix sums: sequence ``b`` is rows
    ``cu_seqlens[b]:cu_seqlens[b + 1]``, and masks align per sequence. Returns
    out ``(total_q, Hq, Dv)`` and with ``return_lse`` lse ``(Hq, total_q)``.
    """
    plan, params = _plan_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          causal=causal, scale=scale, window=window, softcap=softcap,
                                          dropout_p=dropout_p, return_lse=return_lse, backend=backend)
    out, lse = _ATTENTION_VARLEN(q, k, v, backend=plan.backend, cu_seqlens_q=cu_seqlens_q,
                                 cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                 dropout_seed=dropout_seed(params["dropout_p"]), **params)
    return (out, lse) if return_lse else out
