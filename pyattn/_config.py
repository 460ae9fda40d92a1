"""The one place pyattn reads environment variables, and only when asked."""
from __future__ import annotations

import os
from typing import Optional


def default_backend() -> Optional[str]:
    """`PYATTN_BACKEND`: the backend used when a call passes `backend=None`."""
    value = os.environ.get("PYATTN_BACKEND", "").strip()
    return value or None


def triton_interpret() -> bool:
    """`TRITON_INTERPRET=1`: Triton kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
