"""The CUDA C++ backend (`pyattn._cuda`).

Its kernels compile on every machine but run only on a GPU; until they have
passed the GPU test suite on real hardware, `backend=None` does not pick them.
"""
from __future__ import annotations

from typing import Optional

import torch


NAME = "cuda"
DEFAULT_OK = False
_FEATURES = frozenset({"window", "softcap", "causal"})
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unavailable() -> Optional[str]:
    from .. import _extension

    reason = _extension.cuda_unavailable_reason()
    if reason is None and not torch.cuda.is_available():
        reason = "torch sees no CUDA device"
    return reason


def cannot_run(request) -> Optional[str]:
    if request.device.type != "cuda":
        return f"inputs are on {request.device}, the cuda backend runs CUDA tensors"
    if request.op != "attention":
        return f"no CUDA C++ kernel for {request.op} yet"
    if request.dtype not in _DTYPES:
        return f"the CUDA C++ kernel runs float16, bfloat16 and float32, got {request.dtype}"
    if request.needs_grad:
        return "the CUDA C++ kernel has no backward yet (inputs require grad)"
    unsupported = request.features - _FEATURES
    if unsupported:
        return f"the CUDA C++ kernel does not support {', '.join(sorted(unsupported))} yet"
    return None


def kernel(request) -> str:
    return "pyattn._cuda attention forward (unverified)"


def attention_forward(inputs, *, dropout_seed, causal, scale, window_left, window_right, softcap, dropout_p):
    from ..launchers import cuda_softmax

    q, k, v, _ = inputs
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    cuda_softmax.softmax_forward(q, k, v, out, lse, scale=scale, causal=causal, window_left=window_left,
                                 window_right=window_right, softcap=softcap)
    return out, lse
