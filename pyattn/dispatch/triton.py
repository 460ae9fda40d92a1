"""The Triton backend (`pyattn.kernels`).

Triton kernels run on CUDA tensors, and on CPU tensors under the Triton
interpreter (`TRITON_INTERPRET=1`, set before triton is imported).
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from .._config import triton_interpret

NAME = "triton"
DEFAULT_OK = True
_OPS = frozenset()  # ops with a Triton kernel; the softmax family lands with issue 3


def unavailable() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not torch.cuda.is_available() and not triton_interpret():
        return "no CUDA device, and TRITON_INTERPRET=1 is not set"
    return None


def cannot_run(request) -> Optional[str]:
    if request.op not in _OPS:
        return f"no Triton kernel for {request.op} yet"
    if request.device.type == "cpu" and not triton_interpret():
        return "CPU tensors run on Triton only under the interpreter (TRITON_INTERPRET=1)"
    return None


def kernel(request) -> str:
    return f"pyattn.kernels {request.op}"
