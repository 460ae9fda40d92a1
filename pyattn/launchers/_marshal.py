"""What every launcher does the same way: fetch a compiled module, flatten tensors to raw arguments."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch


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
