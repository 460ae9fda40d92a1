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
from ._marshal import compiled, pointer_and_strides

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_MAP_CODES = {"identity": 0, "elu": 1, "relu": 2}


def _module():
    return compiled(_extension.load_cpu, _extension.cpu_unavailable_reason)


def _args(module, q, k, v, *, causal, feature_map, normalize, scale, eps):
    b, hq, s, f = q.shape
    return module.LinearArgs(sizes=(b, hq, k.shape[1], s, f, v.shape[-1]), dtype=_DTYPE_CODES[q.dtype],
                             feature_map=_MAP_CODES[feature_map], causal=bool(causal), normalize=bool(normalize),
                             scale=float(scale), eps=float(eps))


def _inputs(q, k, v, log_decay, state_s, state_z):
    return (pointer_and_strides(q, 4), pointer_and_strides(k, 4), pointer_and_strides(v, 4),
            pointer_and_strides(log_decay, 3), pointer_and_strides(state_s, 4), pointer_and_strides(state_z, 3))


def linear_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                   state_s: Optional[torch.Tensor], state_z: Optional[torch.Tensor], out: torch.Tensor,
                   final_s: Optional[torch.Tensor], final_z: Optional[torch.Tensor], *, causal: bool,
                   feature_map: str, normalize: bool, scale: float, eps: float) -> None:
    """Writes ``out`` (B, Hq, S, Dv) and, when given, the final state (S (B, Hq, F, Dv), z (B, Hq, F))."""
    module = _module()
    module.linear_forward(*_inputs(q, k, v, log_decay, state_s, state_z), pointer_and_strides(out, 4),
                          pointer_and_strides(final_s, 4), pointer_and_strides(final_z, 3),
                          args=_args(module, q, k, v, causal=causal, feature_map=feature_map, normalize=normalize,
                                     scale=scale, eps=eps),
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
    module.linear_backward(*_inputs(q, k, v, log_decay, state_s, state_z), pointer_and_strides(dout, 4),
                           pointer_and_strides(dfinal_s, 4), pointer_and_strides(dfinal_z, 3),
                           pointer_and_strides(dq, 4), pointer_and_strides(dk, 4), pointer_and_strides(dv, 4),
                           pointer_and_strides(dlog_decay, 3), pointer_and_strides(dstate_s, 4),
                           pointer_and_strides(dstate_z, 3),
                           args=_args(module, q, k, v, causal=causal, feature_map=feature_map, normalize=normalize,
                                      scale=scale, eps=eps),
                           num_threads=torch.get_num_threads())
