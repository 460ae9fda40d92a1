"""Launcher of the C++ CPU linear-recurrent attention, forward and backward (``pyattn._C``).

q (B, Hq, S, F), k (B, Hkv, S, F), v (B, Hkv, S, Dv) with any strides, one dtype
(float32, float16 or bfloat16); ``log_decay`` None or a float32 (B, Hq, S) tensor (stride 0
on broadcast dims is fine); states float32. ``feature_map`` is "identity", "elu" (elu + 1)
or "relu", applied inside the kernel. Semantics: ``shared/API.md`` section 2
(``pyattn.reference.linear_attention``). Kernels run on ``torch.get_num_threads()`` threads.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _extension
from ._marshal import compiled, linear_args, linear_inputs, pointer_and_strides


def _module():
    return compiled(_extension.load_cpu, _extension.cpu_unavailable_reason)


def linear_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                   state_s: Optional[torch.Tensor], state_z: Optional[torch.Tensor], out: torch.Tensor,
                   final_s: Optional[torch.Tensor], final_z: Optional[torch.Tensor], *, causal: bool,
                   feature_map: str, normalize: bool, scale: float, eps: float) -> None:
    """Writes ``out`` (B, Hq, S, Dv) and, when given, the final state (S (B, Hq, F, Dv), z (B, Hq, F))."""
    module = _module()
    module.linear_forward(*linear_inputs(q, k, v, log_decay, state_s, state_z), pointer_and_strides(out, 4),
                          pointer_and_strides(final_s, 4), pointer_and_strides(final_z, 3),
                          args=linear_args(module, q, k, v, causal=causal, feature_map=feature_map,
                                           normalize=normalize, scale=scale, eps=eps),
                          num_threads=torch.get_num_threads())


def linear_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                    state_s: Optional[torch.Tensor], state_z: Optional[torch.Tensor], dout: Optional[torch.Tensor],
                    dfinal_s: Optional[torch.Tensor], dfinal_z: Optional[torch.Tensor], dq: torch.Tensor,
                    dk: torch.Tensor, dv: torch.Tensor, dlog_decay: Optional[torch.Tensor],
                    dstate_s: Optional[torch.Tensor], dstate_z: Optional[torch.Tensor], *, causal: bool,
                    feature_map: str, normalize: bool, scale: float, eps: float) -> None:
    """Writes dq, dk, dv (shapes and dtype of q, k, v) and, when given, dlog_decay (B, Hq, S) float32 and
    the initial state's gradients. ``dout``, ``dfinal_s``, ``dfinal_z``: None means zero."""
    module = _module()
    module.linear_backward(*linear_inputs(q, k, v, log_decay, state_s, state_z), pointer_and_strides(dout, 4),
                           pointer_and_strides(dfinal_s, 4), pointer_and_strides(dfinal_z, 3),
                           pointer_and_strides(dq, 4), pointer_and_strides(dk, 4), pointer_and_strides(dv, 4),
                           pointer_and_strides(dlog_decay, 3), pointer_and_strides(dstate_s, 4),
                           pointer_and_strides(dstate_z, 3),
                           args=linear_args(module, q, k, v, causal=causal, feature_map=feature_map,
                                            normalize=normalize, scale=scale, eps=eps),
                           num_threads=torch.get_num_threads())
