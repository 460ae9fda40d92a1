"""Timing and peak memory of one step, in ways that can be trusted.

* Warm-up calls first (lazy initialisation, compilation, caches, allocator); on CPU they stop
  after one once half the time budget is spent.
* GPU: CUDA events around each call, the device synchronised once at the end; before each
  call a 256 MiB buffer is overwritten so every call starts with a cold L2 (as
  ``triton.testing.do_bench``), unless ``flush_l2=False``.
* CPU: ``time.perf_counter`` around each call; the caller fixes the thread count
  (``torch.set_num_threads``) once for the whole run.
* Repetitions: at least ``min_reps`` and at most ``reps``, stopping early once
  ``budget_s`` seconds have been spent, so a slow provider does not hold up a sweep.
  The result keeps every time; the median is the number, the interquartile range the spread.

Peak memory is what one call needs above what was allocated before it: on CUDA from the
caching allocator's statistics; on Linux CPU from the process's peak resident set, reset
just before the call (``/proc/self/clear_refs``) after handing free heap back to the system
(``malloc_trim``). The CPU number is approximate (it counts pages, and memory the
allocator kept from earlier calls is reused unseen) and ``None`` where it cannot be read.
"""
from __future__ import annotations

import ctypes
import dataclasses
import statistics
import time
from typing import Callable, List, Optional

import torch

_L2_FLUSH_BYTES = 256 * 2**20


@dataclasses.dataclass
class Timing:
    times_ms: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    def quantile(self, p: float) -> float:
        """Linear interpolation between order statistics (numpy's default)."""
        xs = sorted(self.times_ms)
        pos = p * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def spread(self) -> float:
        """Interquartile range, ms."""
        return self.quantile(0.75) - self.quantile(0.25)


def measure(step: Callable[[], object], device: torch.device, *, warmup: int = 2, reps: int = 20,
            min_reps: int = 3, budget_s: float = 2.0, flush_l2: bool = True) -> Timing:
    """Times `step()` (module docstring)."""
    if device.type == "cuda":
        return _measure_cuda(step, device, warmup, reps, min_reps, budget_s, flush_l2)
    warm_start = time.perf_counter()
    for _ in range(warmup):  # a slow step is warm after one call: do not spend the budget warming it
        step()
        if time.perf_counter() - warm_start > budget_s / 2:
            break
    times = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - t0))
    return Timing(times)


def _measure_cuda(step, device, warmup, reps, min_reps, budget_s, flush_l2) -> Timing:
    with torch.cuda.device(device):
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        # estimate one call's time to size the repetitions within the budget without syncing each call
        probe_start, probe_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        probe_start.record()
        step()
        probe_end.record()
        torch.cuda.synchronize()
        each_s = max(probe_start.elapsed_time(probe_end) / 1e3, 1e-6)
        n = max(min_reps, min(reps, int(budget_s / each_s)))
        flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            if flush is not None:
                flush.zero_()
            starts[i].record()
            step()
            ends[i].record()
        torch.cuda.synchronize()
        return Timing([s.elapsed_time(e) for s, e in zip(starts, ends)])


# --------------------------------------------------------------------------- peak memory


def _read_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size to the current one (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_memory_bytes(step: Callable[[], object], device: torch.device) -> Optional[int]:
    """Extra memory one call of `step` needs at its peak (module docstring); None if unknown."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before
    if device.type != "cpu" or not _reset_cpu_peak():
        step()
        return None
    before = _read_status_kib("VmRSS")
    step()
    peak = _read_status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024
