"""Runs a sweep: every provider on every case, checked on the first shape, then timed.

For each shape (in order), each (dtype, causal, pass) and each provider:

1. a provider whose probe failed is *skipped* with the probe's reason;
2. ``build`` raising `Unsupported`, or the first call raising one of the provider's
   ``cannot_run`` exceptions (or running out of memory), is *skipped* with that reason;
3. on the first shape the output (and for backward passes the gradients of q, k, v)
   is compared with the family's plain-PyTorch reference computed in float64; a
   provider off by more than ``4 * (atol + rtol * max|reference|)`` (pyattn.testing's
   tolerances for the dtype) or raising anything else is *failed*, is not timed, and
   stays failed for that (dtype, causal, pass) on the later shapes;
4. otherwise it is timed (`pyattn.bench.timing.measure`) and its peak memory read.

The first shape's check runs at most ``check_max_seq`` tokens (queries and keys cut
to that), so a long first shape does not need an S x S float64 reference.
Speed ratios against a baseline provider are filled in by `add_ratios`.
"""
from __future__ import annotations

import dataclasses
import gc
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

from pyattn.testing import TOLERANCES

from . import flops as flops_mod
from .case import Case, Shape
from .families import FAMILIES, make_inputs
from .registry import Provider, Unsupported
from .timing import measure, peak_memory_bytes

CHECK_FACTOR = 4.0


@dataclasses.dataclass
class Settings:
    warmup: int = 2
    reps: int = 20
    min_reps: int = 3
    budget_s: float = 2.0
    flush_l2: bool = True
    check: bool = True
    check_max_seq: int = 1024
    keep_times: bool = True


class Skipped(Exception):
    """The provider cannot run this case here; the message says why."""


class Failed(Exception):
    """The provider ran but raised or gave a wrong result; the message says what."""


def _with_warnings(message: str, caught) -> str:
    texts = []
    for w in caught:
        text = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
        if text and text not in texts:
            texts.append(text)
    return message + ("" if not texts else " (warnings: " + "; ".join(texts[:3]) + ")")


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(error).lower()


def _first_call(provider: Provider, case: Case, inputs) -> Callable:
    """Builds the provider's call for `case` and runs it once; raises Skipped or Failed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call = provider.build(case, inputs[:3])
            with torch.set_grad_enabled(case.needs_grad):
                call(*inputs[:3])
        except Unsupported as error:
            raise Skipped(_with_warnings(str(error), caught)) from None
        except Exception as error:  # noqa: BLE001  (a provider must never stop the run)
            first_line = (str(error).strip().splitlines() or [""])[0]
            text = _with_warnings(f"{type(error).__name__}: {first_line}", caught)
            if _is_oom(error) or isinstance(error, provider.cannot_run):
                raise Skipped(text) from None
            raise Failed(text) from None
    return call


def _compare(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> Optional[str]:
    if tuple(actual.shape) != tuple(expected.shape):
        return f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.equal(torch.isfinite(a), torch.isfinite(e)):
        return f"{name}: NaN/inf where the reference has none (or the other way round)"
    finite = torch.isfinite(e)
    if not finite.any():
        return None
    err = (a - e)[finite].abs().max().item()
    atol, rtol = TOLERANCES[dtype]
    bound = CHECK_FACTOR * (atol + rtol * e[finite].abs().max().item())
    return None if err <= bound else f"{name}: max error {err:.3g} > tolerance {bound:.3g}"


def check(provider: Provider, case: Case) -> None:
    """Compares the provider with the family's float64 reference on `case`; raises Skipped / Failed."""
    family = FAMILIES[case.family]
    inputs = make_inputs(case, seed=1)
    q, k, v, dout = inputs
    call = _first_call(provider, case, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.set_grad_enabled(case.needs_grad):
                out = call(q, k, v)
                got = [("out", out)]
                if case.needs_grad:
                    got += list(zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout)))
        except Exception as error:  # noqa: BLE001
            raise Failed(f"{type(error).__name__}: {error}") from None
    ref_inputs = [x.detach().double().requires_grad_(case.needs_grad) for x in (q, k, v)]
    with torch.set_grad_enabled(case.needs_grad):
        ref = family.reference(*ref_inputs, case)
        expected = [ref]
        if case.needs_grad:
            expected += list(torch.autograd.grad(ref, ref_inputs, dout.double()))
    for (name, actual), exp in zip(got, expected):
        problem = _compare(name, actual, exp, case.dtype)
        if problem:
            raise Failed(f"wrong result on {case.shape.id}: {problem}")


def _step(call: Callable, case: Case, inputs) -> Callable[[], object]:
    q, k, v, dout = inputs
    if case.pass_ == "fwd":
        def step():
            with torch.no_grad():
                call(q, k, v)
        return step
    if case.pass_ == "bwd":
        out = call(q, k, v)  # the forward once, outside the timing; its graph is kept for every backward

        def step():
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        return step

    def step():
        torch.autograd.grad(call(q, k, v), (q, k, v), dout)
    return step


def _record(provider: Provider, case: Case) -> dict:
    fam = FAMILIES[case.family]
    element = torch.empty((), dtype=case.dtype).element_size()
    return dict(
        family=case.family, provider=provider.name, library=provider.library, shape=case.shape.as_dict(),
        shape_id=case.shape.id, seq=case.shape.seq_k, dtype=case.dtype_name, causal=case.causal,
        **{"pass": case.pass_}, device=str(case.device), status=None, reason=None,
        ms_median=None, ms_spread=None, ms_p25=None, ms_p75=None, ms_min=None, ms_max=None, reps=0,
        flops=flops_mod.flops(case.family, case.shape, case.causal, case.pass_), tflops=None,
        bytes=flops_mod.io_bytes(case.shape, element, case.pass_) if fam.memory_bound else None, gbps=None,
        peak_mem_mib=None, ratio=None, baseline=None)


def _ready_step(provider: Provider, case: Case) -> Callable[[], object]:
    inputs = make_inputs(case)
    call = _first_call(provider, case, inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _step(call, case, inputs)
    except Exception as error:  # noqa: BLE001
        raise Failed(f"{type(error).__name__}: {error}") from None


def prepare(provider: Provider, case: Case, check_first: bool = False) -> Callable[[], object]:
    """The provider's step for `case` (inputs made, first call run, checked if asked), ready to time.

    Raises `Skipped` or `Failed`; used by the pytest-benchmark files in ``bench/``.
    """
    reason = probe_all([provider], case.device)[0]["reason"]
    if reason:
        raise Skipped(reason)
    if check_first:
        check(provider, case)
    return _ready_step(provider, case)


def _time(provider: Provider, case: Case, settings: Settings, row: dict) -> None:
    step = _ready_step(provider, case)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            timing = measure(step, case.device, warmup=settings.warmup, reps=settings.reps,
                             min_reps=settings.min_reps, budget_s=settings.budget_s, flush_l2=settings.flush_l2)
            peak = peak_memory_bytes(step, case.device)
    except Exception as error:  # noqa: BLE001
        text = f"{type(error).__name__}: {error}"
        raise (Skipped(text) if _is_oom(error) else Failed(text)) from None
    ms = timing.median
    row.update(status="ok", ms_median=ms, ms_spread=timing.spread, ms_p25=timing.quantile(0.25),
               ms_p75=timing.quantile(0.75), ms_min=min(timing.times_ms), ms_max=max(timing.times_ms),
               reps=len(timing.times_ms), tflops=row["flops"] / ms / 1e9,
               gbps=None if row["bytes"] is None else row["bytes"] / ms / 1e6,
               peak_mem_mib=None if peak is None else peak / 2**20)
    if settings.keep_times:
        row["times_ms"] = timing.times_ms


def probe_all(providers: Sequence[Provider], device: torch.device) -> List[dict]:
    """Per provider: available here, or skipped with the reason."""
    out = []
    for p in providers:
        try:
            reason = p.probe(device)
        except Exception as error:  # noqa: BLE001
            reason = f"probe raised {type(error).__name__}: {error}"
        out.append(dict(name=p.name, family=p.family, library=p.library, what=p.what,
                        status="skipped" if reason else "available", reason=reason))
    return out


def run(family: str, providers: Sequence[Provider], shapes: Sequence[Shape], dtypes: Sequence[torch.dtype],
        causals: Sequence[bool], passes: Sequence[str], device: torch.device, settings: Settings = Settings(),
        progress=None) -> tuple:
    """Returns (provider statuses, result rows); `progress` gets ``update(text)`` after each measurement."""
    statuses = probe_all(providers, device)
    unavailable = {s["name"]: s["reason"] for s in statuses if s["reason"]}
    failed: Dict[tuple, str] = {}
    rows = []
    for index, shape in enumerate(shapes):
        gc.collect()  # the previous shape's inputs and graphs, before memory is measured again
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for dtype in dtypes:
            for causal in causals:
                for pass_ in passes:
                    case = Case(family, shape, dtype, causal, pass_, device)
                    for provider in providers:
                        row = _record(provider, case)
                        rows.append(row)
                        key = (provider.name,) + case.config_key()
                        try:
                            if provider.name in unavailable:
                                raise Skipped(unavailable[provider.name])
                            if key in failed:
                                raise Failed(failed[key])
                            if index == 0 and settings.check:
                                cap = settings.check_max_seq
                                small = shape.with_seq(min(shape.seq_q, cap), min(shape.seq_k, cap))
                                try:
                                    check(provider, dataclasses.replace(case, shape=small))
                                except Failed as error:
                                    failed[key] = f"failed the correctness check: {error}"
                                    raise Failed(failed[key]) from None
                            _time(provider, case, settings, row)
                        except Skipped as error:
                            row.update(status="skipped", reason=str(error))
                        except Failed as error:
                            row.update(status="failed", reason=str(error))
                        except Exception as error:  # noqa: BLE001  (making inputs, out of memory, ...)
                            row.update(status="skipped" if _is_oom(error) else "failed",
                                       reason=f"{type(error).__name__}: {error}")
                        if progress is not None:
                            progress.update(f"{provider.name} {shape.id} {pass_}")
    return statuses, rows


def add_ratios(rows: List[dict], family: str, baseline: Optional[str] = None) -> None:
    """``ratio = baseline ms / provider ms`` (above 1: faster than the baseline) per case.

    The baseline is `baseline`, else the first of the family's default baselines that ran
    on that case; cases where it did not run get no ratio.
    """
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        groups.setdefault((row["shape_id"], row["dtype"], row["causal"], row["pass"]), []).append(row)
    candidates = (baseline,) if baseline else FAMILIES[family].default_baselines
    for group in groups.values():
        ok = {r["provider"]: r for r in group if r["status"] == "ok"}
        base = next((name for name in candidates if name in ok), None)
        if base is None:
            continue
        for r in group:
            r["baseline"] = base
            if r["status"] == "ok":
                r["ratio"] = ok[base]["ms_median"] / r["ms_median"]
