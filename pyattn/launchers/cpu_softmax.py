"""Launcher of the C++ CPU fused softmax attention forward (``pyattn._C``)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _extension
from ._marshal import compiled, softmax_forward_args


def softmax_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: Optional[torch.Tensor], *, scale: float, causal: bool, window_left: int,
                    window_right: int, softcap: float) -> None:
    """Writes ``out`` (B, Hq, Sq, Dv) and ``lse`` (B, Hq, Sq) in place.

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), out: float32 CPU tensors
    with any strides; lse float32 or None (not written). Semantics: ``shared/API.md``
    section 1 (``pyattn.reference.attention``). Runs on ``torch.get_num_threads()``
    threads of the OpenMP runtime torch loaded (else of pyattn's own sleeping pool).
    """
    compiled(_extension.load_cpu, _extension.cpu_unavailable_reason).softmax_forward(
        *softmax_forward_args(q, k, v, out, lse),
        scale=float(scale), causal=bool(causal), window_left=int(window_left),
        window_right=int(window_right), softcap=float(softcap),
        num_threads=torch.get_num_threads())
