"""Launcher of the C++ CPU fused softmax attention forward (``pyattn._C``)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _extension


def _module():
    module = _extension.load_cpu()
    if module is None:
        raise RuntimeError(_extension.cpu_unavailable_reason())
    return module


def softmax_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: Optional[torch.Tensor], *, scale: float, causal: bool, window_left: int,
                    window_right: int, softcap: float) -> None:
    """Writes ``out`` (B, Hq, Sq, Dv) and ``lse`` (B, Hq, Sq) in place.

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), out: float32 CPU tensors
    with any strides; lse float32 or None (not written). Semantics: ``shared/API.md``
    section 1 (``pyattn.reference.attention``). Runs on ``torch.get_num_threads()``
    threads of pyattn's own pool, whose idle threads sleep.
    """
    _module().softmax_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
        0 if lse is None else lse.data_ptr(),
        q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), out.stride(),
        (0, 0, 0) if lse is None else lse.stride(),
        scale=float(scale), causal=bool(causal), window_left=int(window_left),
        window_right=int(window_right), softcap=float(softcap),
        num_threads=torch.get_num_threads())
