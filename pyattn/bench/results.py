"""The JSON file ``pyattn-bench --json FILE`` writes, and its check.

Schema version 1 (``"schema": "pyattn-bench"``, ``"schema_version": 1``)::

    {
      "schema": "pyattn-bench", "schema_version": 1,
      "date": "2026-11-23T15:04:05+00:00",          # UTC, when the run ended
      "command": "pyattn-bench softmax ...",         # as typed
      "args": {...},                                 # every parsed option
      "family": "softmax",
      "machine": {"platform": str, "python": str, "cpu_model": str, "cpu_count": int,
                  "threads": int,                    # torch.get_num_threads() during the run
                  "device": "cpu" | "cuda:0", "device_name": str,   # GPU name, or the CPU model
                  "gpu": {"name", "capability", "memory_gib", "cuda", "driver"?} | null,
                  "pyattn_isa": str | null,          # the CPU kernels' instruction set
                  "load_average": [1 min, 5 min, 15 min] | null},   # at the end: other work skews CPU timings
      "versions": {"pyattn": str, "torch": str, "triton": str | null, "numpy": str | null,
                   "flash_attn": ..., "xformers": ..., "fla": ..., "matplotlib": ...},  # null: not installed
      "providers": [{"name", "family", "library", "what",
                     "status": "available" | "skipped", "reason": str | null}],
      "results": [{
        "family", "provider", "library",
        "shape": {"batch", "heads_q", "heads_kv", "seq_q", "seq_k", "head_dim", "head_dim_v"},
        "shape_id": "B1-H8-S1024-D64", "seq": int (seq_k, the x axis of the plot),
        "dtype": "float32" | "float16" | "bfloat16", "causal": bool, "pass": "fwd" | "bwd" | "fwd+bwd",
        "device": str,
        "status": "ok" | "skipped" | "failed", "reason": str | null,    # why skipped or failed
        "ms_median", "ms_spread" (interquartile range), "ms_p25", "ms_p75", "ms_min", "ms_max": float | null,
        "reps": int, "times_ms": [float] (every timed call; absent with --no-times),
        "flops": float, "tflops": float | null,                 # pyattn.bench.flops
        "bytes": float | null, "gbps": float | null,            # memory-bound families only
        "peak_mem_mib": float | null,                           # pyattn.bench.timing
        "ratio": float | null,          # baseline ms / this ms, > 1 is faster than the baseline
        "baseline": str | null
      }]
    }

Timings, FLOP rates and memory are null unless ``status == "ok"``.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
from typing import List, Optional

import torch

import pyattn

SCHEMA = "pyattn-bench"
SCHEMA_VERSION = 1

_RESULT_KEYS = {
    "family": str, "provider": str, "library": str, "shape": dict, "shape_id": str, "seq": int, "dtype": str,
    "causal": bool, "pass": str, "device": str, "status": str, "reason": (str, type(None)),
    "ms_median": (float, type(None)), "ms_spread": (float, type(None)), "ms_p25": (float, type(None)),
    "ms_p75": (float, type(None)), "ms_min": (float, type(None)), "ms_max": (float, type(None)), "reps": int,
    "flops": float, "tflops": (float, type(None)), "bytes": (float, type(None)), "gbps": (float, type(None)),
    "peak_mem_mib": (float, type(None)), "ratio": (float, type(None)), "baseline": (str, type(None)),
}
_SHAPE_KEYS = ("batch", "heads_q", "heads_kv", "seq_q", "seq_k", "head_dim", "head_dim_v")
_TOP_KEYS = ("schema", "schema_version", "date", "command", "args", "family", "machine", "versions", "providers",
             "results")
_MACHINE_KEYS = ("platform", "python", "cpu_model", "cpu_count", "threads", "device", "device_name", "gpu",
                 "pyattn_isa")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    return {"pyattn": pyattn.__version__, "torch": torch.__version__, "triton": _version("triton"),
            "numpy": _version("numpy"), "flash_attn": _version("flash-attn") or _version("flash_attn"),
            "xformers": _version("xformers"), "fla": _version("flash-linear-attention") or _version("fla-core"),
            "matplotlib": _version("matplotlib"), "tqdm": _version("tqdm")}


def machine(device: torch.device) -> dict:
    gpu = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"name": props.name, "capability": f"{props.major}.{props.minor}",
               "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    try:
        import pyattn._C as compiled
        isa = compiled.current_isa()
    except Exception:  # noqa: BLE001  (no compiled CPU module: nothing to report)
        isa = None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device),
            "device_name": gpu["name"] if gpu else cpu_model(), "gpu": gpu, "pyattn_isa": isa,
            "load_average": _load_average()}


def _load_average() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages when the run ended: a busy machine makes CPU timings slow and noisy."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def make_record(*, command: str, args: dict, family: str, device: torch.device, providers: List[dict],
                results: List[dict]) -> dict:
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "args": args, "family": family, "machine": machine(device),
            "versions": versions(), "providers": providers, "results": results}


def write(record: dict, path: str) -> None:
    validate(record)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def load(path: str) -> dict:
    with open(path) as f:
        record = json.load(f)
    validate(record)
    return record


def _is(value, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:  # JSON may write a whole float as an int
        return True
    return isinstance(value, types)


def validate(record: dict) -> None:
    """Raises ValueError naming the first field that does not follow the schema (module docstring)."""
    if not isinstance(record, dict):
        raise ValueError(f"a pyattn-bench record is a JSON object, got {type(record).__name__}")
    for key in _TOP_KEYS:
        if key not in record:
            raise ValueError(f"missing top-level field {key!r}")
    if record["schema"] != SCHEMA or record["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"schema {record['schema']!r} version {record['schema_version']!r}, "
                         f"expected {SCHEMA!r} version {SCHEMA_VERSION}")
    datetime.datetime.fromisoformat(record["date"])
    for key in _MACHINE_KEYS:
        if key not in record["machine"]:
            raise ValueError(f"missing machine field {key!r}")
    for key in ("pyattn", "torch", "triton"):
        if key not in record["versions"]:
            raise ValueError(f"missing versions field {key!r}")
    for p in record["providers"]:
        for key in ("name", "status", "reason"):
            if key not in p:
                raise ValueError(f"provider entry {p} misses {key!r}")
        if p["status"] not in ("available", "skipped") or (p["status"] == "skipped") != bool(p["reason"]):
            raise ValueError(f"provider {p['name']}: status {p['status']!r} with reason {p['reason']!r}")
    for i, r in enumerate(record["results"]):
        for key, types in _RESULT_KEYS.items():
            if key not in r:
                raise ValueError(f"results[{i}] misses {key!r}")
            if not _is(r[key], types):
                raise ValueError(f"results[{i}].{key} = {r[key]!r} has the wrong type")
        if tuple(sorted(r["shape"])) != tuple(sorted(_SHAPE_KEYS)):
            raise ValueError(f"results[{i}].shape has keys {sorted(r['shape'])}, expected {sorted(_SHAPE_KEYS)}")
        if r["status"] not in ("ok", "skipped", "failed"):
            raise ValueError(f"results[{i}].status = {r['status']!r}")
        if r["pass"] not in ("fwd", "bwd", "fwd+bwd"):
            raise ValueError(f"results[{i}].pass = {r['pass']!r}")
        timed = ("ms_median", "ms_spread", "tflops")
        if r["status"] == "ok" and any(r[k] is None for k in timed):
            raise ValueError(f"results[{i}] is ok but misses a timing")
        if r["status"] != "ok" and (not r["reason"] or any(r[k] is not None for k in timed)):
            raise ValueError(f"results[{i}] is {r['status']} but has timings or no reason")
