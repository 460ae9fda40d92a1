"""Which CUDA C++ kernels have passed the GPU tests, and where they beat Triton.

The record is ``cuda_verified.json`` beside this file, committed and shipped in the wheel. A GPU
session writes it: ``python -m pytest -m gpu --record-cuda-verification`` marks each kernel family
that every GPU test and the compute-sanitizer check exercising it passed (with device, date and
versions), and ``python bench/record_cuda_speed.py RESULTS.json`` adds the shapes where a
pyattn-bench run measured it faster than Triton. ``backend=None`` picks a CUDA kernel only when
it passed and is recorded faster for the call's dtype, head-dim bucket, causality and length;
``backend="cuda"`` runs any of them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

PATH = Path(__file__).with_name("cuda_verified.json")

# Every kernel family of pyattn._cuda (the `kernel` of its launch plans).
KERNELS = ("softmax_fwd_mma", "softmax_fwd_simt", "softmax_decode", "softmax_bwd_mma",
           "linear_chunk_fwd", "linear_recurrent_fwd", "linear_chunk_bwd")

_ABOUT = ("pyattn._cuda kernels that passed the GPU tests and compute-sanitizer on real hardware "
          "(pytest -m gpu --record-cuda-verification), and the shapes where pyattn-bench measured them "
          "faster than Triton (bench/record_cuda_speed.py). See pyattn/dispatch/cuda_registry.py.")


def load(path: Path = PATH) -> Dict[str, dict]:
    """kernel family -> its record ({"status": "unverified"} when none)."""
    try:
        kernels = json.loads(Path(path).read_text()).get("kernels", {})
    except FileNotFoundError:
        kernels = {}
    return {name: dict(kernels.get(name) or {"status": "unverified"}) for name in KERNELS}


def write(records: Dict[str, dict], path: Path = PATH) -> None:
    data = {"about": _ABOUT, "kernels": {name: records.get(name, {"status": "unverified"}) for name in KERNELS}}
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def passed(record: dict) -> bool:
    return record.get("status") == "passed"


def describe(record: dict) -> str:
    """'passed on <device> (<date>)', 'FAILED on ...' or 'unverified'."""
    status = record.get("status", "unverified")
    if status == "unverified":
        return "unverified"
    where = f" on {record.get('device', '?')} ({record.get('date', '?')})"
    return ("passed" if status == "passed" else "FAILED") + where


def faster_than_triton(record: dict, *, direction: str, dtype: str, head_dim_bucket: int, causal: bool,
                       seq: int) -> bool:
    """Whether a recorded benchmark range covers this call: same direction, dtype, bucket and causality,
    and seq within the measured lengths where the kernel won."""
    for r in record.get("faster_than_triton", ()):
        if (r["direction"] == direction and r["dtype"] == dtype and r["head_dim_bucket"] == head_dim_bucket
                and bool(r["causal"]) == bool(causal) and r["seq_min"] <= seq <= r["seq_max"]):
            return True
    return False


# --------------------------------------------------------------------------- writing the record

def summarize_tests(outcomes: Iterable[Tuple[Sequence[str], bool, bool, str]], *, previous: Dict[str, dict],
                    environment: dict) -> Dict[str, dict]:
    """New records from one GPU test run.

    `outcomes`: (kernel families a test exercised, whether it passed, whether it is a compute-sanitizer
    check, its node id). A family passes when at least one test exercised it, none of those failed, and a
    sanitizer check covering it passed; it fails when any failed; families the run did not exercise keep
    their previous record. `environment`: device, date, torch and CUDA versions, stored with the status.
    """
    seen: Dict[str, dict] = {}
    for kernels, ok, sanitizer, nodeid in outcomes:
        for name in kernels:
            if name not in KERNELS:
                raise ValueError(f"unknown CUDA kernel family {name!r} (known: {KERNELS})")
            s = seen.setdefault(name, {"passed": 0, "failed": [], "sanitizer": False})
            if ok:
                s["passed"] += 1
                s["sanitizer"] = s["sanitizer"] or sanitizer
            else:
                s["failed"].append(nodeid)
    records = {name: dict(previous.get(name, {"status": "unverified"})) for name in KERNELS}
    for name, s in seen.items():
        if s["failed"]:
            status = "failed"
        elif s["sanitizer"]:
            status = "passed"
        else:
            status = "unverified"  # correct results, but no memcheck run: not enough to pick it by default
        records[name] = dict(environment, status=status, tests_passed=s["passed"], failed_tests=s["failed"][:20],
                             sanitizer="passed" if s["sanitizer"] else "not run",
                             # a new verification invalidates speed records taken on other code
                             faster_than_triton=[])
    return records


def summarize_speed(rows: Iterable[dict]) -> List[dict]:
    """Ranges where CUDA beat Triton, from paired benchmark rows.

    Each row: kernel, direction, dtype, head_dim_bucket, causal, seq, cuda_ms, triton_ms. Consecutive
    winning lengths of one (kernel, direction, dtype, bucket, causal) merge into one [seq_min, seq_max]
    range with the smallest speedup measured in it.
    """
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        key = (r["kernel"], r["direction"], r["dtype"], int(r["head_dim_bucket"]), bool(r["causal"]))
        groups.setdefault(key, []).append(r)
    ranges = []
    for (kernel, direction, dtype, bucket, causal), items in sorted(groups.items()):
        current: Optional[dict] = None
        for r in sorted(items, key=lambda r: r["seq"]):
            speedup = r["triton_ms"] / r["cuda_ms"]
            if speedup > 1.0:
                if current is None:
                    current = dict(kernel=kernel, direction=direction, dtype=dtype, head_dim_bucket=bucket,
                                   causal=causal, seq_min=r["seq"], seq_max=r["seq"], min_speedup=speedup)
                    ranges.append(current)
                current["seq_max"] = r["seq"]
                current["min_speedup"] = round(min(current["min_speedup"], speedup), 3)
            else:
                current = None
    return ranges
