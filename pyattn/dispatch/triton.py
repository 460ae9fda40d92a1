"""The Triton backend (`pyattn.kernels`).

Triton kernels run on CUDA tensors, and on CPU tensors under the Triton
interpreter (`TRITON_INTERPRET=1`, set before triton is imported). The
interpreter is a debugging aid, so ``backend=None`` passes Triton over for CPU
tensors (`not_default`); ``backend="triton"`` runs it there.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from .._config import triton_interpret

NAME = "triton"
DEFAULT_OK = True
_OPS = frozenset({"attention", "attention_varlen", "linear_attention"})  # ops with a Triton kernel
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


def unavailable() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not torch.cuda.is_available() and not triton_interpret():
        return "no CUDA device, and TRITON_INTERPRET=1 is not set"
    return None


def cannot_run(request) -> Optional[str]:
    if request.op not in _OPS:
        return f"no Triton kernel for {request.op} yet"
    if request.device.type == "cpu":
        if not triton_interpret():
            return "CPU tensors run on Triton only under the interpreter (TRITON_INTERPRET=1)"
    elif request.device.type != "cuda":
        return f"Triton kernels run CUDA tensors (or CPU tensors under the interpreter), got {request.device}"
    if request.dtype not in _DTYPES:
        return f"Triton kernels run float16/bfloat16/float32, got {request.dtype}"
    if max(request.head_dim, request.head_dim_v) > _MAX_HEAD_DIM:
        return (f"Triton kernels run head dims up to {_MAX_HEAD_DIM}, got head_dim {request.head_dim}, "
                f"head_dim_v {request.head_dim_v}")
    return None


def not_default(request) -> Optional[str]:
    if request.device.type == "cpu":
        return "CPU tensors run on Triton under the slow interpreter: only used when named"
    return None


def kernel(request) -> str:
    if request.op == "linear_attention":
        from ..launchers.triton_linear import RECURRENT_MAX_SEQ

        # The Request carries no sequence length, so both forward kernels are named.
        return (f"pyattn.kernels.linear chunked linear attention (Triton); fused recurrent forward when "
                f"seq <= {RECURRENT_MAX_SEQ} (the decoding step)")
    if request.op == "attention_varlen":
        return "pyattn.kernels.softmax varlen flash attention (Triton)"
    # The Request carries no sequence lengths, so both forward kernels are named.
    return ("pyattn.kernels.softmax flash attention (Triton); flash-decoding (split keys) forward when "
            "seq_q <= 16, seq_k >= 256 and no dropout")


def _launcher():
    from ..launchers import triton_softmax

    return triton_softmax


def _flags(causal, scale, window_left, window_right, softcap, dropout_p) -> dict:
    return dict(scale=scale, causal=causal, window_left=window_left, window_right=window_right, softcap=softcap,
                dropout_p=dropout_p)


def _use_decode(q: torch.Tensor, k: torch.Tensor, params: dict) -> bool:
    """Few queries over many keys: the flash-decoding kernel splits the keys across programs, so a
    decoding step fills the GPU; it reads each kv head once for its whole query-head group."""
    return q.shape[2] <= 16 and k.shape[2] >= 256 and params["dropout_p"] == 0.0


def attention_forward(inputs, *, dropout_seed, causal, scale, window_left, window_right, softcap, dropout_p):
    q, k, v, attn_bias = inputs
    params = _flags(causal, scale, window_left, window_right, softcap, dropout_p)
    if _use_decode(q, k, params):
        from ..launchers import triton_decode

        return triton_decode.attention_decode_forward(q, k, v, attn_bias, scale=scale, causal=causal,
                                                      window_left=window_left, window_right=window_right,
                                                      softcap=softcap)
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    _launcher().softmax_forward(q, k, v, attn_bias, dropout_seed, out, lse, **params)
    return out, lse


def _bias_grad(bias: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The (B, Hq, Sq, Sk) logit gradient summed over the dims the bias broadcasts along."""
    dims = [d for d in range(4) if bias.shape[d] == 1 and full.shape[d] != 1]
    grad = full.sum(dims, keepdim=True) if dims else full
    return grad.to(bias.dtype)


def attention_backward(grads, inputs, outputs, needs, *, dropout_seed, causal, scale, window_left, window_right,
                       softcap, dropout_p):
    dout, dlse = grads
    q, k, v, attn_bias = inputs
    out, lse = outputs
    need_q, need_k, need_v, need_bias = needs
    need_bias = need_bias and attn_bias is not None and attn_bias.is_floating_point()
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    dq = torch.empty_like(q) if need_q else None
    dk = torch.empty_like(k) if need_k else None
    dv = torch.empty_like(v) if need_v else None
    dbias_full = None
    if need_bias:
        # dBias is dS summed over the broadcast dims: the one place the (Sq, Sk) scores are materialized.
        dbias_full = torch.zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=torch.float32,
                                 device=q.device)
    _launcher().softmax_backward(dout, dlse, q, k, v, attn_bias, dropout_seed, out, lse, dq, dk, dv, dbias_full,
                                 **_flags(causal, scale, window_left, window_right, softcap, dropout_p))
    dbias = _bias_grad(attn_bias, dbias_full) if need_bias else None
    return dq, dk, dv, dbias


def attention_varlen_forward(inputs, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_seed,
                             causal, scale, window_left, window_right, softcap, dropout_p):
    q, k, v = inputs
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    _launcher().softmax_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       dropout_seed, out, lse,
                                       **_flags(causal, scale, window_left, window_right, softcap, dropout_p))
    return out, lse


def attention_varlen_backward(grads, inputs, outputs, needs, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, dropout_seed, causal, scale, window_left, window_right, softcap,
                              dropout_p):
    dout, dlse = grads
    q, k, v = inputs
    out, lse = outputs
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    dq, dk, dv = (torch.empty_like(x) if need else None for x, need in zip(inputs, needs))
    _launcher().softmax_varlen_backward(dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, dropout_seed, out, lse, dq, dk, dv,
                                        **_flags(causal, scale, window_left, window_right, softcap, dropout_p))
    return dq, dk, dv


def _linear_launcher():
    from ..launchers import triton_linear

    return triton_linear


def linear_attention_forward(inputs, *, causal, feature_map, normalize, scale, eps):
    q, k, v, log_decay, state_s, state_z = inputs
    b, hq, seq, f = q.shape
    dv = v.shape[-1]
    out = torch.empty(b, hq, seq, dv, dtype=q.dtype, device=q.device)
    s = torch.empty(b, hq, f, dv, dtype=torch.float32, device=q.device)
    z = torch.empty(b, hq, f, dtype=torch.float32, device=q.device)
    _linear_launcher().linear_forward(q, k, v, log_decay, state_s, state_z, out, s, z, causal=causal,
                                      feature_map=feature_map, normalize=normalize, scale=scale, eps=eps)
    return out, s, z


def linear_attention_backward(grads, inputs, outputs, needs, *, causal, feature_map, normalize, scale, eps):
    dout, ds, dz = grads
    q, k, v, log_decay, state_s, state_z = inputs
    out, s, z = outputs
    dout = torch.zeros_like(out) if dout is None else dout
    dq, dk, dv, dlog, ds0, dz0 = (torch.empty(x.shape, dtype=x.dtype, device=x.device) if need and x is not None
                                  else None for x, need in zip(inputs, needs))
    _linear_launcher().linear_backward(dout, ds, dz, q, k, v, log_decay, state_s, state_z, out, s, z, dq, dk, dv,
                                       dlog, ds0, dz0, causal=causal, feature_map=feature_map,
                                       normalize=normalize, scale=scale, eps=eps)
    return dq, dk, dv, dlog, ds0, dz0
