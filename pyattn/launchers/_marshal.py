"""What every launcher does the same way: fetch a compiled module, flatten tensors to raw arguments."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

# The compiled modules' codes for dtypes and fused feature maps.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
FEATURE_MAP_CODES = {"identity": 0, "elu": 1, "relu": 2}


def compiled(load: Callable[[], object], reason: Callable[[], Optional[str]]):
    """The compiled module `load()` returns, or a RuntimeError saying why there is none."""
    module = load()
    if module is None:
        raise RuntimeError(reason())
    return module


def softmax_forward_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: Optional[torch.Tensor]) -> tuple:
    """Pointers, sizes and element strides, in the order both modules' ``softmax_forward`` take them."""
    return (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), 0 if lse is None else lse.data_ptr(),
            q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), out.stride(),
            (0, 0, 0) if lse is None else lse.stride())


def packed_as_4d(x: torch.Tensor, batch: int, max_seqlen: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Size and strides of a packed (total, H, D) tensor seen as (batch, H, max_seqlen, D), with batch stride 0:
    the kernel moves to sequence b's first row itself (via cu_seqlens)."""
    return (batch, x.shape[1], max_seqlen, x.shape[2]), (0, x.stride(1), x.stride(0), x.stride(2))


def pointer_and_strides(x: Optional[torch.Tensor], ndim: int) -> Tuple[int, Tuple[int, ...]]:
    """(data_ptr, element strides) of `x`, or (0, zeros) for None."""
    return (0, (0,) * ndim) if x is None else (x.data_ptr(), tuple(x.stride()))



def linear_args(module, q, k, v, *, causal, feature_map, normalize, scale, eps):
    """The plain arguments of a compiled module's linear_forward / linear_backward (its ``LinearArgs``)."""
    b, hq, s, f = q.shape
    return module.LinearArgs(sizes=(b, hq, k.shape[1], s, f, v.shape[-1]), dtype=DTYPE_CODES[q.dtype],
                             feature_map=FEATURE_MAP_CODES[feature_map], causal=bool(causal),
                             normalize=bool(normalize), scale=float(scale), eps=float(eps))


def linear_inputs(q, k, v, log_decay, state_s, state_z):
    """(pointer, strides) of the linear-attention inputs, in the order both modules take them."""
    return (pointer_and_strides(q, 4), pointer_and_strides(k, 4), pointer_and_strides(v, 4),
            pointer_and_strides(log_decay, 3), pointer_and_strides(state_s, 4), pointer_and_strides(state_z, 3))
