"""Launcher of the CUDA fused softmax attention forward (``pyattn._cuda``)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _extension
from ._marshal import compiled, softmax_forward_args

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def softmax_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: Optional[torch.Tensor], *, scale: float, causal: bool, window_left: int,
                    window_right: int, softcap: float) -> None:
    """Queues the forward on the current stream of ``q.device``; writes ``out`` and ``lse``.

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), out (B, Hq, Sq, Dv): CUDA
    tensors of one dtype (float32, float16 or bfloat16) on one device, any strides;
    lse float32 (B, Hq, Sq) or None. Semantics: ``shared/API.md`` section 1.
    """
    device = q.device.index if q.device.index is not None else torch.cuda.current_device()
    compiled(_extension.load_cuda, _extension.cuda_unavailable_reason).softmax_forward(
        *softmax_forward_args(q, k, v, out, lse),
        scale=float(scale), causal=bool(causal), window_left=int(window_left),
        window_right=int(window_right), softcap=float(softcap),
        dtype=_DTYPE_CODES[q.dtype], device=device,
        stream=torch.cuda.current_stream(q.device).cuda_stream)
