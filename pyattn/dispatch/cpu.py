"""The C++ CPU backend (`pyattn._C`)."""
from __future__ import annotations

from typing import Optional

import torch


NAME = "cpu"
DEFAULT_OK = True
_FEATURES = frozenset({"window", "softcap", "causal"})


def unavailable() -> Optional[str]:
    from .. import _extension

    return _extension.cpu_unavailable_reason()


def cannot_run(request) -> Optional[str]:
    if request.device.type != "cpu":
        return f"inputs are on {request.device}, the cpu backend runs CPU tensors"
    if request.op != "attention":
        return f"no C++ CPU kernel for {request.op} yet"
    if request.dtype != torch.float32:
        return f"the C++ CPU kernel runs float32, got {request.dtype}"
    if request.needs_grad:
        return "the C++ CPU kernel has no backward yet (inputs require grad)"
    unsupported = request.features - _FEATURES
    if unsupported:
        return f"the C++ CPU kernel does not support {', '.join(sorted(unsupported))} yet"
    return None


def kernel(request) -> str:
    return "pyattn._C attention forward (float32, blocked online softmax)"


def attention_forward(inputs, *, dropout_seed, causal, scale, window_left, window_right, softcap, dropout_p):
    from ..launchers import cpu_softmax

    q, k, v, _ = inputs
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    cpu_softmax.softmax_forward(q, k, v, out, lse, scale=scale, causal=causal, window_left=window_left,
                                window_right=window_right, softcap=softcap)
    return out, lse
