"""The CUDA C++ backend (`pyattn._cuda`).

Its kernels compile on every machine but run only on a GPU; until they have
passed the GPU test suite on real hardware, `backend=None` does not pick them.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _compiled

NAME = "cuda"
DEFAULT_OK = False


def unavailable() -> Optional[str]:
    from .. import _extension

    reason = _extension.cuda_unavailable_reason()
    if reason is None and not torch.cuda.is_available():
        reason = "torch sees no CUDA device"
    return reason


def cannot_run(request) -> Optional[str]:
    return _compiled.kernel_gap(request, backend=NAME, device_type="cuda", ops=frozenset({"attention"}),
                                dtypes=(torch.float16, torch.bfloat16, torch.float32),
                                features=frozenset({"window", "softcap", "causal"}), kernel_words="CUDA C++")


def kernel(request) -> str:
    return "pyattn._cuda attention forward (unverified)"


def attention_forward(inputs, *, dropout_seed, dropout_p, **params):
    from ..launchers import cuda_softmax

    return _compiled.attention_forward(cuda_softmax.softmax_forward, inputs, **params)
