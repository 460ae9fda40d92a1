"""What the compiled backends (cpu, cuda) share: which calls their kernels take, and the forward and
backward calls that allocate outputs for a launcher."""
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


def linear_attention_forward(launch: Callable, inputs, *, causal, feature_map, normalize, scale, eps):
    """Allocates out and the final state (float32 S, z), and has the launcher `launch` fill them."""
    q, k, v, log_decay, state_s, state_z = inputs
    b, hq, seq, f = q.shape
    dv = v.shape[-1]
    f32 = dict(dtype=torch.float32, device=q.device)
    out = torch.empty((b, hq, seq, dv), dtype=q.dtype, device=q.device)
    final_s = torch.empty((b, hq, f, dv), **f32)
    final_z = torch.empty((b, hq, f), **f32)
    launch(q, k, v, log_decay, state_s, state_z, out, final_s, final_z, causal=causal, feature_map=feature_map,
           normalize=normalize, scale=scale, eps=eps)
    return out, final_s, final_z


def linear_attention_backward(launch: Callable, grads, inputs, needs, *, causal, feature_map, normalize, scale,
                              eps):
    """Allocates the gradients the call needs (float32 for the decays and states) and has `launch` fill them."""
    q, k, v, log_decay, state_s, state_z = inputs
    dout, dfinal_s, dfinal_z = grads
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    want = lambda i, x: bool(needs[i]) and x is not None  # noqa: E731
    f32 = dict(dtype=torch.float32, device=q.device)
    dlog_decay = torch.empty(log_decay.shape, **f32) if want(3, log_decay) else None
    dstate_s = torch.empty(state_s.shape, **f32) if want(4, state_s) else None
    dstate_z = torch.empty(state_z.shape, **f32) if want(5, state_z) else None
    launch(q, k, v, log_decay, state_s, state_z, None if dout is None else dout.to(q.dtype),
           None if dfinal_s is None else dfinal_s.to(torch.float32),
           None if dfinal_z is None else dfinal_z.to(torch.float32), dq, dk, dv, dlog_decay, dstate_s, dstate_z,
           causal=causal, feature_map=feature_map, normalize=normalize, scale=scale, eps=eps)
    return dq, dk, dv, dlog_decay, dstate_s, dstate_z
