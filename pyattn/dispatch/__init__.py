"""Backend registry and the per-call backend choice.

A backend is a module with:

* ``NAME``; ``DEFAULT_OK``: whether ``backend=None`` may pick it (kernels not
  yet verified on real hardware are only run when named);
* optionally ``kernel_status() -> dict``: per kernel, whether it is verified;
* optionally ``not_default(request) -> str | None``: why ``backend=None`` should
  pass it over for this call although it could run it (Triton on CPU tensors
  runs under the slow interpreter: a debugging aid, not a fast path);
* ``unavailable() -> str | None``: why it cannot run anything here;
* ``cannot_run(request) -> str | None``: why it cannot run this call;
* ``kernel(request) -> str``: the kernel that would run, for ``explain``;
* ``<op>_forward(...)`` / ``<op>_backward(...)`` implementations, called by
  the custom ops in ``pyattn.ops``.

The choice happens per call, in Python, before the custom op: ``backend=``,
else ``PYATTN_BACKEND``, else the first backend of ``PRIORITY`` that can run
the call. A named backend that cannot run it raises ``NotImplementedError``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, FrozenSet, Optional, Tuple

import torch

from .. import _config
from . import cpu, cuda, reference, triton

_MODULES = {m.NAME: m for m in (cuda, triton, cpu, reference)}
# Fastest first. The reference backend runs everything, so a choice always exists.
PRIORITY = ("cuda", "triton", "cpu", "reference")


@dataclasses.dataclass(frozen=True)
class Request:
    """What a backend needs to know to say whether it can run a call."""

    op: str
    device: torch.device
    dtype: torch.dtype
    needs_grad: bool
    features: FrozenSet[str] = frozenset()  # e.g. {"dropout", "attn_bias", "softcap", "window"}
    head_dim: int = 0
    head_dim_v: int = 0
    # (B, Hq, Hkv, Sq, Sk) for attention, (B, Hq, Hkv, S) for linear attention; () when unused.
    # Backends that plan launches per shape (cuda) read it.
    shape: Tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Plan:
    """The backend and kernel a call runs on, and why the faster ones were passed over."""

    op: str
    backend: str
    kernel: str
    passed_over: Tuple[Tuple[str, str], ...] = ()

    def __str__(self) -> str:
        lines = [f"{self.op}: backend {self.backend!r}, kernel {self.kernel}"]
        lines += [f"  not {name!r}: {why}" for name, why in self.passed_over]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: Optional[str]  # why it is not available (None when it is)
    default_ok: bool  # whether backend=None may pick it
    # kernel -> its verification status ("unverified", "passed on <device> (<date>)"), for backends whose
    # kernels are picked by default only once verified on hardware (cuda)
    kernels: Dict[str, str] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.available


def get(name: str):
    """The backend module called `name` (used by the custom ops)."""
    return _MODULES[name]


# (name, TRITON_INTERPRET for triton) -> why the backend cannot run here (None: it can). Probing
# imports and devices on every call cost 20-30 us of a ~230 us one-token linear-attention step.
_AVAILABILITY: Dict[Tuple[str, bool], Optional[str]] = {}


def _unavailable(name: str) -> Optional[str]:
    # Probing imports and compiled modules is host work torch.compile need not trace: it is
    # constant for the process (up to TRITON_INTERPRET, which tests set and unset), so dynamo
    # calls it once and keeps the answer, and eager calls reuse the first answer.
    key = (name, name == "triton" and _config.triton_interpret())  # reading the environment costs ~3 us
    if key not in _AVAILABILITY:
        _AVAILABILITY[key] = _MODULES[name].unavailable()
    return _AVAILABILITY[key]


# What torch.compiler.assume_constant_result does, without the 4 s import of torch._dynamo it
# costs every `import pyattn` (tests/test_compile.py fails if torch stops honouring the mark).
_unavailable._dynamo_marked_constant = True


def backends() -> Dict[str, BackendStatus]:
    """Per backend name: whether it is available here, and why not."""
    out = {}
    for name in PRIORITY:
        reason = _unavailable(name)
        status = getattr(_MODULES[name], "kernel_status", dict)()
        out[name] = BackendStatus(reason is None, reason, _MODULES[name].DEFAULT_OK, status)
    return out


def _why_not(name: str, request: Request) -> Optional[str]:
    return _unavailable(name) or _MODULES[name].cannot_run(request)


def choose(request: Request, backend: Optional[str]) -> Plan:
    """Pick the backend for `request`; `backend` is the caller's `backend=` argument."""
    source = "backend"
    if backend is None:
        backend, source = _config.default_backend(), "PYATTN_BACKEND"
    if backend is not None:
        if not isinstance(backend, str) or backend not in _MODULES:
            raise ValueError(f"{source} must be one of {list(PRIORITY)} or None, got {backend!r}")
        why = _why_not(backend, request)
        if why is not None:
            raise NotImplementedError(f"backend {backend!r} (from {source}) cannot run {request.op}: {why}")
        return Plan(request.op, backend, _MODULES[backend].kernel(request))
    passed_over = []
    for name in PRIORITY:
        # A backend barred from default use is not asked further (planning a CUDA launch costs
        # microseconds that a decoding step should not pay for a kernel it will not run).
        why = _unavailable(name) or (None if _MODULES[name].DEFAULT_OK else
                                     "not verified on hardware yet; only used when named")
        why = why or _MODULES[name].cannot_run(request)
        if why is None and hasattr(_MODULES[name], "not_default"):
            why = _MODULES[name].not_default(request)
        if why is None:
            return Plan(request.op, name, _MODULES[name].kernel(request), tuple(passed_over))
        passed_over.append((name, why))
    raise AssertionError("the reference backend runs every request")  # unreachable
