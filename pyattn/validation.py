"""Input checks shared by every public op.

Every check runs in Python before any kernel sees a pointer: the compiled
modules get raw integers and cannot check anything themselves. Each error
names the argument, what it got and what was expected.

Checks that need tensor *values* (cu_seqlens, block indices, decay signs,
lengths) read them on the host. The ops run them inside their custom op's
implementation, where the values exist both in eager mode and in a compiled
graph (while torch.compile traces, values are unknown), still before any kernel.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_INT = 2**62  # ints cross into int64 kernel arguments: keep them, and sums of a few, in range


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"
    return f"{type(x).__name__} {x!r}"


def _finite(x) -> bool:
    # comparisons rather than math.isfinite, which torch.compile cannot trace with dynamic shapes
    return -math.inf < x < math.inf  # False for NaN too


def tensor(name: str, x, *, ndim: Optional[int] = None, dtypes: Optional[Sequence[torch.dtype]] = None) -> torch.Tensor:
    """`x` is a tensor of rank `ndim` with a dtype in `dtypes`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_describe(x)}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        expected = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({expected}), got {x.dtype}")
    return x


def same_dtype_device(names: Iterable[str], tensors: Iterable[torch.Tensor]) -> None:
    """All tensors share the first one's dtype and device."""
    names, tensors = list(names), list(tensors)
    first_name, first = names[0], tensors[0]
    for name, x in zip(names[1:], tensors[1:]):
        if x.dtype != first.dtype:
            raise TypeError(f"{name} must have the dtype of {first_name} ({first.dtype}), got {x.dtype}")
        if x.device != first.device:
            raise ValueError(f"{name} must be on the device of {first_name} ({first.device}), got {x.device}")


def qkv(q, k, v, *, layout: str = "bhsd", q_name: str = "q", k_name: str = "k", v_name: str = "v"):
    """q, k, v for the (batch, heads, seq, dim) layout or the packed (total, heads, dim) one.

    Returns (heads_q, heads_kv, head_dim, head_dim_v).
    """
    ndim = 4 if layout == "bhsd" else 3
    for name, x in ((q_name, q), (k_name, k), (v_name, v)):
        tensor(name, x, ndim=ndim, dtypes=FLOAT_DTYPES)
    same_dtype_device((q_name, k_name, v_name), (q, k, v))
    h_axis, s_axis = (1, 2) if layout == "bhsd" else (1, 0)
    if layout == "bhsd":
        if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
            raise ValueError(
                f"batch sizes differ: {q_name} has {q.shape[0]}, {k_name} {k.shape[0]}, {v_name} {v.shape[0]}")
    if v.shape[h_axis] != k.shape[h_axis]:
        raise ValueError(f"{v_name} must have the heads of {k_name} ({k.shape[h_axis]}), got {v.shape[h_axis]} "
                         f"(shape {tuple(v.shape)})")
    if v.shape[s_axis] != k.shape[s_axis]:
        raise ValueError(f"{v_name} must have the sequence length of {k_name} ({k.shape[s_axis]}), "
                         f"got {v.shape[s_axis]} (shape {tuple(v.shape)})")
    hq, hkv = q.shape[h_axis], k.shape[h_axis]
    if hkv == 0 or hq == 0 or hq % hkv != 0:
        raise ValueError(f"heads of {q_name} ({hq}) must be a positive multiple of the heads of {k_name} ({hkv})")
    d, dv = q.shape[-1], v.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"{k_name} must have the head_dim of {q_name} ({d}), got {k.shape[-1]}")
    if d == 0 or dv == 0:
        raise ValueError(f"head_dim must be positive, got {q_name} head_dim {d}, {v_name} head_dim {dv}")
    return hq, hkv, d, dv


def scale(value, head_dim: int) -> float:
    """`scale=None` means 1/sqrt(head_dim); otherwise a finite real number."""
    if value is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"scale must be a float or None, got {_describe(value)}")
    if not _finite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return float(value)


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}")
    return value


def nonnegative_float(name: str, value, *, below: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {_describe(value)}")
    if not _finite(value) or value < 0 or (below is not None and value >= below):
        bound = f"in [0, {below})" if below is not None else ">= 0 and finite"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return float(value)


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    if not minimum <= value <= MAX_INT:
        raise ValueError(f"{name} must be >= {minimum} and <= 2**62, got {value}")
    return value


def window(value) -> tuple:
    """`(left, right)` with each -1 (unbounded) or >= 0."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"window must be a (left, right) pair of ints, got {_describe(value)}")
    for side, w in zip(("left", "right"), value):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"window {side} must be an int, got {_describe(w)}")
        if not -1 <= w <= MAX_INT:
            raise ValueError(f"window {side} must be -1 (unbounded) or in [0, 2**62], got {w}")
    return int(value[0]), int(value[1])


def broadcastable(name: str, x: torch.Tensor, shape: Sequence[int]) -> None:
    """`x` broadcasts to `shape` (numpy rules, right-aligned)."""
    ok = x.dim() <= len(shape) and all(
        a == 1 or a == b for a, b in zip(reversed(x.shape), reversed(shape)))
    if not ok:
        raise ValueError(f"{name} of shape {tuple(x.shape)} does not broadcast to {tuple(shape)}")


def attn_bias(x, shape, dtype: torch.dtype, device: torch.device) -> None:
    """Float bias (q's dtype or float32) or bool mask, broadcastable to `shape`."""
    tensor("attn_bias", x, dtypes=tuple(dict.fromkeys((torch.bool, dtype, torch.float32))))
    if x.device != device:
        raise ValueError(f"attn_bias must be on the device of q ({device}), got {x.device}")
    broadcastable("attn_bias", x, shape)


def cu_seqlens(name: str, cu, max_seqlen, max_name: str, device: torch.device) -> None:
    """int32 (batch+1,) on `device`; `max_seqlen` a non-negative int (values: `cu_seqlens_values`)."""
    tensor(name, cu, ndim=1, dtypes=(torch.int32,))
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must have at least one entry (batch + 1), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on the device of q ({device}), got {cu.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"{max_name} must be a non-negative int, got {_describe(max_seqlen)}")


def cu_seqlens_values(name: str, cu: torch.Tensor, total: int, max_seqlen: int, max_name: str) -> None:
    """Prefix sums from 0 to `total`, non-decreasing, with no step above `max_seqlen`."""
    values = cu.cpu()
    if values[0].item() != 0 or values[-1].item() != total:
        raise ValueError(f"{name} must start at 0 and end at the packed length {total}, "
                         f"got first {values[0].item()} and last {values[-1].item()}")
    steps = values[1:] - values[:-1]
    if steps.numel() and steps.min().item() < 0:
        raise ValueError(f"{name} must be non-decreasing, got {values.tolist()}")
    if steps.numel() and steps.max().item() > max_seqlen:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest sequence in {name} "
                         f"({steps.max().item()})")


def int_values_in(name: str, x: torch.Tensor, low: int, high: int, what: str) -> None:
    """Every value of integer tensor `x` lies in [low, high]."""
    if x.numel() == 0:
        return
    lo, hi = x.min().item(), x.max().item()
    if lo < low or hi > high:
        raise ValueError(f"{name} values must be {what} (in [{low}, {high}]), got values in [{lo}, {hi}]")


def float_values_at_most(name: str, x: torch.Tensor, bound: float) -> None:
    if x.numel() == 0:
        return
    hi = x.max().item()
    if not hi <= bound:  # also catches NaN
        raise ValueError(f"{name} must be <= {bound} everywhere, got a maximum of {hi}")
