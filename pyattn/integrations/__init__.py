"""Integrations of pyattn with other libraries.

Each submodule imports its library only when one of its functions is called,
so ``import pyattn`` never imports them:

* ``pyattn.integrations.transformers``: Hugging Face transformers
  (``register()`` adds the ``"pyattn"`` attention implementation).
"""
from __future__ import annotations

import importlib

_SUBMODULES = ("transformers",)


def __getattr__(name):
    # `pyattn.integrations.transformers` works after a plain `import pyattn`, without importing it eagerly
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_SUBMODULES)
