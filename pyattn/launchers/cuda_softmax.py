"""Launcher of the CUDA fused softmax attention forward (``pyattn._cuda``)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _extension

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _module():
    module = _extension.load_cuda()
    if module is None:
        raise RuntimeError(_extension.cuda_unavailable_reason())
    return module


def softmax_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: Optional[torch.Tensor], *, scale: float, causal: bool, window_left: int,
                    window_right: int, softcap: float) -> None:
    """Queues the forward on the current stream of ``q.device``; writes ``out`` and ``lse``.

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), out (B, Hq, Sq, Dv): CUDA
    tensors of one dtype (float32, float16 or bfloat16) on one device, any strides;
    lse float32 (B, Hq, Sq) or None. Semantics: ``shared/API.md`` section 1.
    """
    device = q.device.index if q.device.index is not None else torch.cuda.current_device()
    _module().softmax_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
        0 if lse is None else lse.data_ptr(),
        q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), out.stride(),
        (0, 0, 0) if lse is None else lse.stride(),
        scale=float(scale), causal=bool(causal), window_left=int(window_left),
        window_right=int(window_right), softcap=float(softcap),
        dtype=_DTYPE_CODES[q.dtype], device=device,
        stream=torch.cuda.current_stream(q.device).cuda_stream)
