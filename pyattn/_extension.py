"""Lazy access to pyattn's compiled modules.

``pyattn._C`` (C++ CPU kernels) and ``pyattn._cuda`` (CUDA kernels) are optional at run
time: a source checkout without a build, or a build on a machine without nvcc, still
imports ``pyattn``. Each module is imported on the first call that asks for it and the
outcome (module or reason) is cached. Nothing here reads the environment.

``load_cuda()`` returning a module means the kernels were compiled and the module
imports (it needs no GPU to import); whether a GPU is present is ``torch.cuda``'s call.
"""
from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import Dict, Optional, Tuple

_lock = threading.Lock()
_cache: Dict[str, Tuple[Optional[ModuleType], Optional[str]]] = {}

_NOT_BUILT = {
    "pyattn._C": "pyattn._C was not built (install pyattn with pip to compile it)",
    "pyattn._cuda": "pyattn._cuda was not built (no nvcc at build time, or built with PYATTN_DISABLE_CUDA=1)",
}


def _load(name: str) -> Tuple[Optional[ModuleType], Optional[str]]:
    with _lock:
        if name not in _cache:
            try:
                _cache[name] = (importlib.import_module(name), None)
            except ModuleNotFoundError as exc:
                if exc.name == name:
                    _cache[name] = (None, _NOT_BUILT[name])
                else:
                    _cache[name] = (None, f"importing {name} failed: {exc}")
            except ImportError as exc:  # built, but cannot be loaded here (ABI, missing symbol, ...)
                _cache[name] = (None, f"importing {name} failed: {exc}")
        return _cache[name]


def load_cpu() -> Optional[ModuleType]:
    """The ``pyattn._C`` module, or None if it cannot be imported."""
    return _load("pyattn._C")[0]


def load_cuda() -> Optional[ModuleType]:
    """The ``pyattn._cuda`` module, or None if it cannot be imported."""
    return _load("pyattn._cuda")[0]


def cpu_unavailable_reason() -> Optional[str]:
    """Why ``pyattn._C`` cannot be used, or None if it can."""
    return _load("pyattn._C")[1]


def cuda_unavailable_reason() -> Optional[str]:
    """Why ``pyattn._cuda`` cannot be used, or None if it imports."""
    return _load("pyattn._cuda")[1]
