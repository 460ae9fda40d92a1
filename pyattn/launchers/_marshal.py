"""What every launcher does the same way: fetch a compiled module, flatten tensors to raw arguments."""
from __future__ import annotations

from typing import Callable, Optional

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
