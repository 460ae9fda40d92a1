"""What the compiled backends (cpu, cuda) share: which calls their kernels take, and the forward call."""
from __future__ import annotations

from typing import Callable, FrozenSet, Optional, Tuple

import torch


def kernel_gap(request, *, backend: str, device_type: str, ops: FrozenSet[str], dtypes: Tuple[torch.dtype, ...],
               features: FrozenSet[str], kernel_words: str, backward: bool = False) -> Optional[str]:
    """Why the compiled kernels of `backend` cannot run `request` (None when they can).

    `backward`: whether they have the backward of every op in `ops` (else calls whose inputs
    require grad go elsewhere)."""
    if request.device.type != device_type:
        return f"inputs are on {request.device}, the {backend} backend runs {device_type.upper()} tensors"
    if request.op not in ops:
        return f"no {kernel_words} kernel for {request.op} yet"
    if request.dtype not in dtypes:
        return f"the {kernel_words} kernel runs {', '.join(str(d) for d in dtypes)}, got {request.dtype}"
    if request.needs_grad and not backward:
        return f"the {kernel_words} kernel has no backward yet (inputs require grad)"
    unsupported = request.features - features
    if unsupported:
        return f"the {kernel_words} kernel does not support {', '.join(sorted(unsupported))} yet"
    return None


def attention_forward(launch: Callable, inputs, *, scale, causal, window_left, window_right, softcap):
    """Allocates out and lse, and has the launcher `launch` fill them."""
    q, k, v, _ = inputs
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    launch(q, k, v, out, lse, scale=scale, causal=causal, window_left=window_left, window_right=window_right,
           softcap=softcap)
    return out, lse
