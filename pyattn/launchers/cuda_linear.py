"""Launcher of the CUDA causal linear-recurrent attention (``pyattn._cuda``), forward and backward.

Arguments as ``pyattn.launchers.cpu_linear``'s, on CUDA tensors: q (B, Hq, S, F), k (B, Hkv, S, F),
v (B, Hkv, S, Dv), any strides, one dtype; ``log_decay`` None or float32 (B, Hq, S); states float32.
Up to 16 tokens (the decoding step) step through the recurrence, longer inputs run chunked: the
module's launch plan decides (``plan``). Semantics: ``shared/API.md`` section 2.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._marshal import linear_args, linear_inputs, pointer_and_strides
from .cuda_softmax import _launch_kw, module, workspace


def plan(direction: str, args, *, has_decay: bool, has_initial_state: bool, has_final_state: bool,
         device_info: tuple) -> dict:
    """The module's launch plan for 'forward' or 'backward' (see pyattn._cuda.plan_linear)."""
    return module().plan_linear(direction, args, has_decay=bool(has_decay), has_initial_state=bool(has_initial_state),
                                has_final_state=bool(has_final_state), device_info=device_info)


def linear_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                   state_s: Optional[torch.Tensor], state_z: Optional[torch.Tensor], out: torch.Tensor,
                   final_s: Optional[torch.Tensor], final_z: Optional[torch.Tensor], *, causal: bool,
                   feature_map: str, normalize: bool, scale: float, eps: float) -> None:
    """Queues the forward: ``out`` (B, Hq, S, Dv) and, when given, the final state."""
    m, kw = module(), _launch_kw(q)
    kw.pop("dtype")
    args = linear_args(m, q, k, v, causal=causal, feature_map=feature_map, normalize=normalize, scale=scale,
                       eps=eps)
    ws, _buf = workspace(plan("forward", args, has_decay=log_decay is not None, has_initial_state=state_s is not None,
                              has_final_state=final_s is not None, device_info=kw["device_info"]), q.device)
    m.linear_forward(*linear_inputs(q, k, v, log_decay, state_s, state_z), pointer_and_strides(out, 4),
                     pointer_and_strides(final_s, 4), pointer_and_strides(final_z, 3), args=args, workspace=ws, **kw)


def linear_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                    state_s: Optional[torch.Tensor], state_z: Optional[torch.Tensor], dout: Optional[torch.Tensor],
                    dfinal_s: Optional[torch.Tensor], dfinal_z: Optional[torch.Tensor], dq: torch.Tensor,
                    dk: torch.Tensor, dv: torch.Tensor, dlog_decay: Optional[torch.Tensor],
                    dstate_s: Optional[torch.Tensor], dstate_z: Optional[torch.Tensor], *, causal: bool,
                    feature_map: str, normalize: bool, scale: float, eps: float) -> None:
    """Queues the backward (see ``cpu_linear.linear_backward``)."""
    m, kw = module(), _launch_kw(q)
    kw.pop("dtype")
    args = linear_args(m, q, k, v, causal=causal, feature_map=feature_map, normalize=normalize, scale=scale,
                       eps=eps)
    ws, _buf = workspace(plan("backward", args, has_decay=log_decay is not None,
                              has_initial_state=state_s is not None, has_final_state=True,
                              device_info=kw["device_info"]), q.device)
    t4, t3 = (lambda x: pointer_and_strides(x, 4)), (lambda x: pointer_and_strides(x, 3))
    m.linear_backward(*linear_inputs(q, k, v, log_decay, state_s, state_z), t4(dout), t4(dfinal_s), t3(dfinal_z),
                      t4(dq), t4(dk), t4(dv), t3(dlog_decay), t4(dstate_s), t3(dstate_z), args=args, workspace=ws,
                      **kw)
