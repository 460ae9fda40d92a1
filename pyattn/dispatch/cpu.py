"""The C++ CPU backend (`pyattn._C`)."""
from __future__ import annotations

from typing import Optional

import torch

from . import _compiled

NAME = "cpu"
DEFAULT_OK = True


def unavailable() -> Optional[str]:
    from .. import _extension

    return _extension.cpu_unavailable_reason()


def cannot_run(request) -> Optional[str]:
    return _compiled.kernel_gap(request, backend=NAME, device_type="cpu", ops=frozenset({"attention"}),
                                dtypes=(torch.float32,), features=frozenset({"window", "softcap", "causal"}),
                                kernel_words="C++ CPU")


def kernel(request) -> str:
    return "pyattn._C attention forward (float32, blocked online softmax)"


def attention_forward(inputs, *, dropout_seed, dropout_p, **params):
    from ..launchers import cpu_softmax

    return _compiled.attention_forward(cpu_softmax.softmax_forward, inputs, **params)
