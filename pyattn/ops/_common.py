"""Small pieces every op module uses."""
from __future__ import annotations

from typing import Optional

import torch


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd will want gradients of any of `tensors` from this call."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of lse and recurrent states: float32, float64 for float64 inputs (exact gradchecks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_seed(dropout_p: float) -> Optional[torch.Tensor]:
    """A seed drawn from torch's default generator, so dropout follows `torch.manual_seed`."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**62, (), dtype=torch.int64)
