"""The C++ CPU backend (`pyattn._C`): fused softmax attention, dense and packed, and chunked
linear-recurrent attention, forward and backward."""
from __future__ import annotations

from typing import Optional

import torch

from . import _compiled

NAME = "cpu"
DEFAULT_OK = True

_OPS = frozenset({"attention", "attention_varlen", "linear_attention"})
# float64 goes to the reference backend: the kernels compute in float32.
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FEATURES = frozenset({"window", "softcap", "causal", "attn_bias", "dropout",  # softmax
                       "decay", "initial_state"})  # linear


def unavailable() -> Optional[str]:
    from .. import _extension

    return _extension.cpu_unavailable_reason()


def cannot_run(request) -> Optional[str]:
    if request.op == "linear_attention" and request.head_dim == 0:
        return "the feature map gives 0 features; the C++ CPU kernel needs at least one"
    return _compiled.kernel_gap(request, backend=NAME, device_type="cpu", ops=_OPS, dtypes=_DTYPES,
                                features=_FEATURES, kernel_words="C++ CPU", backward=True)


def kernel(request) -> str:
    dtype = str(request.dtype).replace("torch.", "")
    if request.op == "linear_attention":
        return (f"pyattn._C linear_attention {'forward+backward' if request.needs_grad else 'forward'} "
                f"({dtype} in, float32 state; chunks of 64 tokens, a token loop for up to 4)")
    return (f"pyattn._C {request.op} {'forward+backward' if request.needs_grad else 'forward'} "
            f"({dtype} in, float32 accumulation, blocked online softmax)")


def _seed(dropout_seed: Optional[torch.Tensor]) -> int:
    return 0 if dropout_seed is None else int(dropout_seed.item())


def _kernel_bias(bias: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor) -> Optional[torch.Tensor]:
    """attn_bias as the kernel reads it: bool or float32, expanded to (B, Hq, Sq, Sk) with stride 0 on its
    broadcast dims (converting a bfloat16 bias only converts the elements it has)."""
    if bias is None:
        return None
    if bias.dtype not in (torch.bool, torch.float32):
        bias = bias[tuple(slice(0, 1) if st == 0 else slice(None) for st in bias.stride())].to(torch.float32)
    return bias.expand(q.shape[:3] + (k.shape[2],))


def _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    return cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k)


def _zero_uncovered_rows(x: torch.Tensor, cu: torch.Tensor, dim: int, value: float = 0.0) -> None:
    """Rows past cu[-1] belong to no sequence: the kernel leaves them, the reference gives `value`."""
    covered = int(cu[-1].item()) if cu.numel() else 0
    if covered < x.shape[dim]:
        x.narrow(dim, covered, x.shape[dim] - covered).fill_(value)


def attention_forward(inputs, *, dropout_seed, causal, scale, window_left, window_right, softcap, dropout_p):
    from ..launchers import cpu_softmax

    q, k, v, bias = inputs
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32)
    cpu_softmax.softmax_forward(q, k, v, out, lse, scale=scale, causal=causal, window_left=window_left,
                                window_right=window_right, softcap=softcap, attn_bias=_kernel_bias(bias, q, k),
                                dropout_p=dropout_p, dropout_seed=_seed(dropout_seed))
    return out, lse


def _dout(dout: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(out) if dout is None else dout.to(out.dtype)


def attention_backward(grads, inputs, outputs, needs, *, dropout_seed, causal, scale, window_left, window_right,
                       softcap, dropout_p):
    from ..launchers import cpu_softmax

    q, k, v, bias = inputs
    out, lse = outputs
    dout, dlse = _dout(grads[0], out), grads[1]
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype) for x in (q, k, v))
    want_dbias = bool(needs[3]) and bias is not None and bias.is_floating_point()
    dbias = torch.zeros(q.shape[:3] + (k.shape[2],), dtype=torch.float32) if want_dbias else None
    cpu_softmax.softmax_backward(q, k, v, out, dout, lse, dlse, dq, dk, dv, dbias, scale=scale, causal=causal,
                                 window_left=window_left, window_right=window_right, softcap=softcap,
                                 attn_bias=_kernel_bias(bias, q, k), dropout_p=dropout_p,
                                 dropout_seed=_seed(dropout_seed))
    if dbias is not None:
        # dS is the gradient of the full (B, Hq, Sq, Sk) scores: sum it over the bias's broadcast dims
        dims = tuple(d for d in range(4) if bias.shape[d] == 1 and dbias.shape[d] != 1)
        dbias = (dbias.sum(dims, keepdim=True) if dims else dbias).to(bias.dtype)
    return dq, dk, dv, dbias


def attention_varlen_forward(inputs, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_seed,
                             causal, scale, window_left, window_right, softcap, dropout_p):
    from ..launchers import cpu_softmax

    q, k, v = inputs
    varlen = _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    cpu_softmax.softmax_forward(q, k, v, out, lse, scale=scale, causal=causal, window_left=window_left,
                                window_right=window_right, softcap=softcap, dropout_p=dropout_p,
                                dropout_seed=_seed(dropout_seed), varlen=varlen)
    _zero_uncovered_rows(out, varlen[0], 0)
    _zero_uncovered_rows(lse, varlen[0], 1, float("-inf"))
    return out, lse


def attention_varlen_backward(grads, inputs, outputs, needs, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, dropout_seed, causal, scale, window_left, window_right, softcap,
                              dropout_p):
    from ..launchers import cpu_softmax

    q, k, v = inputs
    out, lse = outputs
    dout, dlse = _dout(grads[0], out), grads[1]
    varlen = _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype) for x in (q, k, v))
    cpu_softmax.softmax_backward(q, k, v, out, dout, lse, dlse, dq, dk, dv, None, scale=scale,
                                 causal=causal, window_left=window_left, window_right=window_right, softcap=softcap,
                                 dropout_p=dropout_p, dropout_seed=_seed(dropout_seed), varlen=varlen)
    _zero_uncovered_rows(dq, varlen[0], 0)
    _zero_uncovered_rows(dk, varlen[1], 0)
    _zero_uncovered_rows(dv, varlen[1], 0)
    return dq, dk, dv


# --------------------------------------------------------------------------- linear attention

def linear_attention_forward(inputs, **params):
    from ..launchers import cpu_linear

    return _compiled.linear_attention_forward(cpu_linear.linear_forward, inputs, **params)


def linear_attention_backward(grads, inputs, outputs, needs, **params):
    from ..launchers import cpu_linear

    return _compiled.linear_attention_backward(cpu_linear.linear_backward, grads, inputs, needs, **params)
