"""The provider registry: every implementation pyattn-bench can time, per op family.

A `Provider` names an implementation (``pyattn-cpu``, ``sdpa-flash``, ``flex``,
``flash-attn``, ...) and knows how to call it with pyattn's ``(B, H, S, D)`` tensors:

* ``probe(device) -> reason | None``: why it cannot run anything on this device here
  (library not installed, backend unavailable). Cheap, imports nothing heavy.
* ``build(case, (q, k, v)) -> call``: a ``call(q, k, v) -> out`` for one case, or raises
  `Unsupported` with the reason it cannot run that case.
* ``cannot_run``: exception types that, raised by the first call, mean "cannot run these
  inputs" (SDPA's "no viable backend" RuntimeError, for instance) and not "broken".

A provider that cannot run is reported as *skipped* with its reason, never as an error;
one whose first call raises anything else, or whose result differs from the
reference, is reported as *failed* and is not timed (see `pyattn.bench.runner`).

Providers by family (all of them always listed; what is missing is skipped):

* softmax, decode, cross: ``pyattn-<backend>`` for every pyattn backend (cuda, triton, cpu,
  reference; Triton on CPU tensors only under ``TRITON_INTERPRET=1``), torch SDPA one backend
  at a time through ``torch.nn.attention.sdpa_kernel`` (``sdpa-math``, ``sdpa-efficient``,
  ``sdpa-flash``, ``sdpa-cudnn``), ``flex`` (``torch.compile``-d FlexAttention),
  ``flash-attn`` (``flash_attn_func``) and ``xformers``
  (``memory_efficient_attention``).
* linear: ``pyattn-<backend>``, ``torch-loop`` (the reference's token loop), ``torch-chunked``
  (`pyattn.bench.baselines.chunked_linear_attention`) and ``fla-chunk``
  (flash-linear-attention's ``chunk_linear_attn``, causal only).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import pyattn
from pyattn import dispatch

from .baselines import chunked_linear_attention
from .case import Case
from .families import FAMILIES


class Unsupported(Exception):
    """A provider cannot run a case here; the message is the reason shown as 'skipped'."""


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    family: str
    library: str
    what: str
    probe: Callable[[torch.device], Optional[str]]
    build: Callable[[Case, tuple], Callable]
    cannot_run: Tuple[type, ...] = ()


# --------------------------------------------------------------------------- probes


def _installed(module: str, package: str) -> Callable[[torch.device], Optional[str]]:
    def probe(device: torch.device) -> Optional[str]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError) as error:
            return f"{package} cannot be found: {error}"
        return None if found else f"{package} is not installed (no module {module!r})"
    return probe


def _cuda_only(inner: Callable, what: str) -> Callable[[torch.device], Optional[str]]:
    def probe(device: torch.device) -> Optional[str]:
        return inner(device) or (None if device.type == "cuda" else f"{what} runs on CUDA devices only")
    return probe


def _import(module: str):
    try:
        return importlib.import_module(module)
    except Exception as error:  # a broken install is a reason to skip, not to stop the run
        raise Unsupported(f"import {module} failed: {type(error).__name__}: {error}") from None


# --------------------------------------------------------------------------- pyattn


def _pyattn(family: str, backend: str) -> Provider:
    fam = FAMILIES[family]

    def probe(device: torch.device) -> Optional[str]:
        return pyattn.backends()[backend].reason

    def build(case: Case, inputs: tuple) -> Callable:
        kwargs = fam.op_kwargs(case)
        try:  # the same checks the call makes, without running it
            pyattn.explain(fam.op, *inputs, backend=backend, **kwargs)
        except NotImplementedError as error:
            raise Unsupported(str(error)) from None

        def call(q, k, v):
            return fam.op(q, k, v, backend=backend, **kwargs)
        return call

    return Provider(f"pyattn-{backend}", family, "pyattn", f"pyattn.{fam.op.__name__}(backend={backend!r})",
                    probe, build, (NotImplementedError,))


# --------------------------------------------------------------------------- torch SDPA

_SDPA = {"math": "MATH", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


def _sdpa_mask_kwargs(case: Case, q, k) -> dict:
    """SDPA's is_causal is top-left; pyattn's causal is bottom-right (they agree when Sq == Sk)."""
    kwargs = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    sq, sk = q.shape[2], k.shape[2]
    if case.causal and sq == sk:
        kwargs["is_causal"] = True
    elif case.causal and sq > 1:
        from torch.nn.attention.bias import causal_lower_right
        kwargs["attn_mask"] = causal_lower_right(sq, sk)
    # causal with one query: it is the last one and sees every key
    return kwargs


def _sdpa_tiny_call(kernel, device: torch.device) -> Optional[str]:
    """Whether this SDPA backend has a kernel for the device at all: one tiny call says it."""
    from torch.nn.attention import sdpa_kernel
    x = torch.zeros(1, 1, 16, 16, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(kernel):
                F.scaled_dot_product_attention(x, x, x)
        except RuntimeError as error:
            why = "; ".join(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught
                                          if str(w.message).strip()))
            return f"torch has no {kernel.name} kernel for {device.type} tensors ({why or 'SDPA: no viable backend'})"
    return None


def _sdpa(family: str, backend: str) -> Provider:
    enum_name = _SDPA[backend]

    def probe(device: torch.device) -> Optional[str]:
        from torch.nn.attention import SDPBackend
        if not hasattr(SDPBackend, enum_name):
            return f"torch {torch.__version__} has no SDPBackend.{enum_name}"
        if backend == "cudnn" and device.type == "cuda" and not torch.backends.cudnn.is_available():
            return "cuDNN is not available to torch"
        return _sdpa_tiny_call(getattr(SDPBackend, enum_name), device)

    def build(case: Case, inputs: tuple) -> Callable:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kwargs = _sdpa_mask_kwargs(case, inputs[0], inputs[1])
        kernel = getattr(SDPBackend, enum_name)

        def call(q, k, v):
            with sdpa_kernel(kernel):
                return F.scaled_dot_product_attention(q, k, v, **kwargs)
        return call

    # SDPA raises RuntimeError ("No viable backend ...") for a backend that cannot take the inputs
    return Provider(f"sdpa-{backend}", family, "torch",
                    f"torch.nn.functional.scaled_dot_product_attention, SDPBackend.{enum_name} only",
                    probe, build, (RuntimeError, NotImplementedError))


# --------------------------------------------------------------------------- FlexAttention

_FLEX_COMPILED = {}


def _flex(family: str) -> Provider:
    def probe(device: torch.device) -> Optional[str]:
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return f"torch {torch.__version__} has no FlexAttention"
        return None

    def build(case: Case, inputs: tuple) -> Callable:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        q, k, _ = inputs
        sq, sk = q.shape[2], k.shape[2]
        block_mask = None
        if case.causal:
            offset = sk - sq  # bottom-right, as pyattn.attention

            def bottom_right(b, h, q_idx, kv_idx):
                return q_idx + offset >= kv_idx
            block_mask = create_block_mask(bottom_right, None, None, sq, sk, device=q.device)
        if "fn" not in _FLEX_COMPILED:
            # one compiled graph per shape and mask; the default limit of 8 would fall back to eager
            # (which materialises the scores) partway through a sweep
            config = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(config, name):
                    setattr(config, name, max(getattr(config, name), 256))
            _FLEX_COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
        compiled = _FLEX_COMPILED["fn"]
        gqa = q.shape[1] != k.shape[1]

        def call(q, k, v):
            return compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)
        return call

    # compilation can fail in many ways on a platform inductor does not support: all are "cannot run here"
    return Provider("flex", family, "torch", "torch.compile(flex_attention) with a bottom-right causal block mask",
                    probe, build, (Exception,))


# --------------------------------------------------------------------------- flash-attn, xformers


def _flash_attn(family: str) -> Provider:
    def build(case: Case, inputs: tuple) -> Callable:
        flash_attn = _import("flash_attn")
        causal = case.causal  # flash-attn >= 2.1 aligns causal bottom-right, as pyattn

        def call(q, k, v):
            out = flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
            return out.transpose(1, 2)
        return call

    return Provider("flash-attn", family, "flash-attn", "flash_attn.flash_attn_func on (B, S, H, D) views",
                    _cuda_only(_installed("flash_attn", "flash-attn"), "flash-attn"), build,
                    (RuntimeError, NotImplementedError))


def _xformers(family: str) -> Provider:
    def build(case: Case, inputs: tuple) -> Callable:
        xops = _import("xformers.ops")
        q, k, _ = inputs
        bias = None
        if case.causal:
            from xformers.ops import fmha
            bias = (fmha.attn_bias.LowerTriangularMask() if q.shape[2] == k.shape[2]
                    else fmha.attn_bias.LowerTriangularFromBottomRightMask())
        group = q.shape[1] // k.shape[1]

        def call(q, k, v):
            b, hq, sq, _ = q.shape
            hkv = k.shape[1]
            if group == 1:
                out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      attn_bias=bias)
                return out.transpose(1, 2)
            # GQA: xformers' 5-d (B, S, G, H/G, D) form, kv broadcast over the group without a copy
            q5 = q.transpose(1, 2).unflatten(2, (hkv, group))
            k5, v5 = (x.transpose(1, 2)[:, :, :, None].expand(-1, -1, -1, group, -1) for x in (k, v))
            out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias)
            return out.flatten(2, 3).transpose(1, 2)
        return call

    return Provider("xformers", family, "xformers", "xformers.ops.memory_efficient_attention",
                    _installed("xformers", "xformers"), build, (RuntimeError, NotImplementedError, ValueError))


# --------------------------------------------------------------------------- linear baselines


def _torch_loop() -> Provider:
    def build(case: Case, inputs: tuple) -> Callable:
        causal = case.causal

        def call(q, k, v):
            return pyattn.reference.linear_attention_recurrent(q, k, v, causal=causal, feature_map="elu")
        return call

    return Provider("torch-loop", "linear", "torch", "plain PyTorch token loop (pyattn.reference."
                    "linear_attention_recurrent)", lambda device: None, build)


def _torch_chunked() -> Provider:
    def build(case: Case, inputs: tuple) -> Callable:
        causal = case.causal

        def call(q, k, v):
            return chunked_linear_attention(q, k, v, causal=causal)
        return call

    return Provider("torch-chunked", "linear", "torch", "plain PyTorch, chunks of 64 (pyattn.bench.baselines)",
                    lambda device: None, build)


def _fla_chunk() -> Provider:
    def build(case: Case, inputs: tuple) -> Callable:
        if not case.causal:
            raise Unsupported("flash-linear-attention's linear attention is causal only")
        fla_linear = _import("fla.ops.linear_attn")
        fn = fla_linear.chunk_linear_attn
        layout = {"head_first": False} if "head_first" in inspect.signature(fn).parameters else {}
        group = inputs[0].shape[1] // inputs[1].shape[1]

        def call(q, k, v):
            # fla takes the features: apply elu+1 here (pyattn fuses it), kv heads repeated for GQA
            qf = F.elu(q) + 1
            kf, vv = ((F.elu(k) + 1).repeat_interleave(group, 1), v.repeat_interleave(group, 1))
            out, _ = fn(qf.transpose(1, 2), kf.transpose(1, 2), vv.transpose(1, 2), scale=1.0, normalize=True,
                        **layout)
            return out.transpose(1, 2)
        return call

    return Provider("fla-chunk", "linear", "fla", "fla.ops.linear_attn.chunk_linear_attn (elu+1 applied first)",
                    _cuda_only(_installed("fla", "flash-linear-attention"), "flash-linear-attention"), build,
                    (RuntimeError, NotImplementedError))


# --------------------------------------------------------------------------- the registry


def providers(family: str) -> List[Provider]:
    """Every provider of `family`, pyattn's backends first (fastest first), then other libraries."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    out = [_pyattn(family, name) for name in dispatch.PRIORITY]
    if family == "linear":
        return out + [_torch_loop(), _torch_chunked(), _fla_chunk()]
    out += [_sdpa(family, name) for name in _SDPA]
    return out + [_flex(family), _flash_attn(family), _xformers(family)]


def select(family: str, names: Sequence[str] = ("all",), exclude: Sequence[str] = ()) -> List[Provider]:
    """The providers called `names` ("all" for every one), in registry order, minus `exclude`."""
    every = providers(family)
    known = {p.name for p in every}
    unknown = [n for n in names if n != "all" and n not in known]
    # an excluded name may belong to another family (``--exclude flex`` for every family)
    anywhere = {p.name for fam in FAMILIES for p in providers(fam)}
    unknown += [n for n in exclude if n not in anywhere]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown} for family {family!r}; known: {sorted(known)}")
    wanted = known if "all" in names else set(names)
    return [p for p in every if p.name in wanted and p.name not in set(exclude)]
