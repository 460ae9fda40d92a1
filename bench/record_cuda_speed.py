"""Record where the CUDA C++ kernels beat Triton, from pyattn-bench runs on a GPU.

    pyattn-bench softmax --providers pyattn-cuda,pyattn-triton --dtype bfloat16 --dim 128 \\
        --tokens 16384 --seqlens 1024,2048,4096,8192,16384 --causal both --pass fwd,bwd --json S.json
    python bench/record_cuda_speed.py S.json [D.json L.json ...]

Pairs each pyattn-cuda row with the pyattn-triton row of the same family, shape, dtype, causality
and pass, names the CUDA kernel family that ran it (the module's launch plan on this GPU), and
writes the lengths where CUDA was faster into pyattn/dispatch/cuda_verified.json, for kernels
already marked passed by `pytest -m gpu --record-cuda-verification` (others are reported and
skipped: an unverified kernel is never picked by default, however fast). Run it on the GPU the
benchmarks ran on.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from pyattn import dispatch
from pyattn.dispatch import cuda as cuda_backend
from pyattn.dispatch import cuda_registry

DIRECTIONS = {"fwd": "forward", "bwd": "backward"}  # fwd+bwd rows are not a single kernel's time


def _request(row: dict) -> dispatch.Request:
    s = row["shape"]
    dtype = getattr(torch, row["dtype"])
    needs_grad = row["pass"] != "fwd"
    features = frozenset({"causal"} if row["causal"] else ())
    if row["family"] == "linear":
        return dispatch.Request("linear_attention", torch.device("cuda", 0), dtype, needs_grad, features,
                                s["head_dim"], s["head_dim_v"], (s["batch"], s["heads_q"], s["heads_kv"], s["seq_q"]))
    return dispatch.Request("attention", torch.device("cuda", 0), dtype, needs_grad, features, s["head_dim"],
                            s["head_dim_v"], (s["batch"], s["heads_q"], s["heads_kv"], s["seq_q"], s["seq_k"]))


def paired_rows(results: list) -> list:
    """Rows of summarize_speed: one per (cuda, triton) pair that both ran."""
    key = lambda r: (r["family"], r["shape_id"], r["dtype"], r["causal"], r["pass"])  # noqa: E731
    triton = {key(r): r for r in results if r["provider"] == "pyattn-triton" and r["status"] == "ok"}
    rows = []
    for r in results:
        other = triton.get(key(r))
        if r["provider"] != "pyattn-cuda" or r["status"] != "ok" or other is None or r["pass"] not in DIRECTIONS:
            continue
        direction = DIRECTIONS[r["pass"]]
        plan = dict(cuda_backend.plans(_request(r)))[direction]
        length = r["shape"]["seq_q"] if r["family"] == "linear" else r["shape"]["seq_k"]
        rows.append(dict(kernel=plan["kernel"], direction=direction, dtype=r["dtype"],
                         head_dim_bucket=plan["head_dim_bucket"], causal=bool(r["causal"]), seq=length,
                         cuda_ms=r["ms_median"], triton_ms=other["ms_median"]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="pyattn-bench --json files")
    args = p.parse_args(argv)
    rows = [row for path in args.results for row in paired_rows(json.load(open(path))["results"])]
    records = cuda_registry.load()
    ranges = cuda_registry.summarize_speed(rows)
    for name in cuda_registry.KERNELS:
        if cuda_registry.passed(records[name]):
            records[name]["faster_than_triton"] = [{k: v for k, v in r.items() if k != "kernel"}
                                                   for r in ranges if r["kernel"] == name]
        elif any(r["kernel"] == name for r in rows):
            print(f"{name}: {cuda_registry.describe(records[name])}; its timings are not recorded", file=sys.stderr)
    cuda_registry.write(records)
    for r in ranges:
        print(f"{r['kernel']} {r['direction']} {r['dtype']} d{r['head_dim_bucket']} "
              f"{'causal' if r['causal'] else 'full'}: faster at seq {r['seq_min']}..{r['seq_max']} "
              f"(>= {r['min_speedup']}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
