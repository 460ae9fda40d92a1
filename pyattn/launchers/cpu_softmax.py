"""Launcher of the C++ CPU fused softmax attention, forward and backward (``pyattn._C``).

Dense tensors are (B, H, S, D) with any strides. Packed (varlen) tensors are
(total, H, D) with ``varlen=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)``
(int32 contiguous prefix sums; every sequence no longer than its max); their lse is
(Hq, total_q). Semantics: ``shared/API.md`` section 1 (``pyattn.reference.attention``,
``attention_varlen``). Kernels run on ``torch.get_num_threads()`` threads of the OpenMP
runtime torch loaded (else of pyattn's own sleeping pool).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _extension
from ..reference import dropout_threshold
from ._marshal import DTYPE_CODES, compiled, packed_as_4d, pointer_and_strides, softmax_forward_args

Varlen = Tuple[torch.Tensor, torch.Tensor, int, int]


def _module():
    return compiled(_extension.load_cpu, _extension.cpu_unavailable_reason)


def _features(module, q: torch.Tensor, k: torch.Tensor, attn_bias: Optional[torch.Tensor], dropout_p: float,
              dropout_seed: int, varlen: Optional[Varlen]):
    """dtype, attn_bias (float32 or bool, 4-D, broadcast dims of stride 0), dropout and varlen arguments."""
    bias_ptr, bias_stride = pointer_and_strides(attn_bias, 4)
    bias_kind = 0 if attn_bias is None else (2 if attn_bias.dtype == torch.bool else 1)
    cu_q = cu_k = 0
    if varlen is not None:
        cu_q, cu_k = varlen[0].data_ptr(), varlen[1].data_ptr()
        total_q, total_k = q.shape[0], k.shape[0]
        # counter (h * total_q + row_q) * total_k + row_k; the kernel adds each sequence's start
        counter_stride = (0, total_q * total_k, total_k)
    else:
        _, heads, seq_q, _ = q.shape
        seq_k = k.shape[2]
        counter_stride = (heads * seq_q * seq_k, seq_q * seq_k, seq_k)
    return module.Features(dtype=DTYPE_CODES[q.dtype], bias=bias_ptr, bias_kind=bias_kind, bias_stride=bias_stride,
                           dropout_p=float(dropout_p),
                           dropout_threshold=dropout_threshold(dropout_p) if dropout_p else 0,
                           dropout_seed=int(dropout_seed) & 0xFFFFFFFFFFFFFFFF, dropout_stride=counter_stride,
                           cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def _sizes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, varlen: Optional[Varlen]):
    """(size, strides) of q, k, v as the kernel's 4-D (B, H, S, D) tensors."""
    if varlen is None:
        return [(x.shape, x.stride()) for x in (q, k, v)]
    batch = varlen[0].shape[0] - 1
    return [packed_as_4d(q, batch, varlen[2]), packed_as_4d(k, batch, varlen[3]), packed_as_4d(v, batch, varlen[3])]


def _rows_strides(x: torch.Tensor, varlen: Optional[Varlen]):
    """Strides of an output or gradient shaped like q (or k): packed ones as (0, H, row, D)."""
    return x.stride() if varlen is None else (0, x.stride(1), x.stride(0), x.stride(2))


def _lse_strides(lse: Optional[torch.Tensor], varlen: Optional[Varlen]):
    if lse is None:
        return (0, 0, 0)
    return lse.stride() if varlen is None else (0, lse.stride(0), lse.stride(1))


def softmax_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: Optional[torch.Tensor], *, scale: float, causal: bool, window_left: int,
                    window_right: int, softcap: float, attn_bias: Optional[torch.Tensor] = None,
                    dropout_p: float = 0.0, dropout_seed: int = 0, varlen: Optional[Varlen] = None) -> None:
    """Writes ``out`` (B, Hq, Sq, Dv) and ``lse`` (B, Hq, Sq) in place (lse None: not written).

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), out: CPU tensors of one dtype
    (float32, float16 or bfloat16) with any strides; lse float32. ``attn_bias``: float32 or
    bool, 4-D, broadcast dims of size 1 or stride 0. With ``varlen`` the tensors are packed.
    """
    module = _module()
    if varlen is None:
        args = softmax_forward_args(q, k, v, out, lse)
    else:
        (q_size, q_stride), (k_size, k_stride), (v_size, v_stride) = _sizes(q, k, v, varlen)
        args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), 0 if lse is None else lse.data_ptr(),
                q_size, q_stride, k_size, k_stride, v_size, v_stride, _rows_strides(out, varlen),
                _lse_strides(lse, varlen))
    module.softmax_forward(
        *args, scale=float(scale), causal=bool(causal), window_left=int(window_left),
        window_right=int(window_right), softcap=float(softcap), num_threads=torch.get_num_threads(),
        features=_features(module, q, k, attn_bias, dropout_p, dropout_seed, varlen))


def softmax_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                     lse: torch.Tensor, dlse: Optional[torch.Tensor], dq: torch.Tensor, dk: torch.Tensor,
                     dv: torch.Tensor, dbias: Optional[torch.Tensor], *, scale: float, causal: bool,
                     window_left: int, window_right: int, softcap: float, attn_bias: Optional[torch.Tensor] = None,
                     dropout_p: float = 0.0, dropout_seed: int = 0, varlen: Optional[Varlen] = None) -> None:
    """Writes dq, dk, dv (shapes of q, k, v, their dtype, any strides) and, when given, dbias.

    ``out`` and ``lse`` are the forward's outputs; ``dout``, ``dlse`` (None: zero) their
    gradients. ``dbias``: float32 (B, Hq, Sq, Sk) gradient of the final scores, filled with
    zeros by the caller (blocks no query sees are skipped). Other arguments as in
    `softmax_forward`, with the same dropout seed.
    """
    module = _module()
    (q_size, q_stride), (k_size, k_stride), (v_size, v_stride) = _sizes(q, k, v, varlen)
    rows = lambda x: (x.data_ptr(), _rows_strides(x, varlen))  # noqa: E731
    module.softmax_backward(
        (q.data_ptr(), q_stride), (k.data_ptr(), k_stride), (v.data_ptr(), v_stride), rows(out), rows(dout),
        (lse.data_ptr(), _lse_strides(lse, varlen)),
        (0, (0, 0, 0)) if dlse is None else (dlse.data_ptr(), _lse_strides(dlse, varlen)),
        rows(dq), rows(dk), rows(dv), pointer_and_strides(dbias, 4), q_size, k_size, v_size,
        scale=float(scale), causal=bool(causal), window_left=int(window_left), window_right=int(window_right),
        softcap=float(softcap), num_threads=torch.get_num_threads(),
        features=_features(module, q, k, attn_bias, dropout_p, dropout_seed, varlen))
