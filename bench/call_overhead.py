"""What one small attention call costs, end to end: pyattn's entry points beside torch SDPA.

    python bench/call_overhead.py [--rounds 15] [--calls 200] [--json bench/results/FILE.json]

Small calls (a decoding step over a short context, a tiny prefill) are bounded by per-call work
in Python (input checks, the backend choice, the torch custom op, allocations), not by the
kernel. Per shape, under ``torch.no_grad``, calls of each entry point alternate round by round in
one process; each round times ``--calls`` calls in a row. Reported: the median time per call of
each entry point, and the median over rounds of SDPA's time / the entry point's time. The
``launcher`` row calls pyattn's C++ kernel through its launcher alone, with the outputs already
allocated: the part of a call that is the kernel.
"""
import argparse
import datetime
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import pyattn
from pyattn.bench.results import cpu_model
from pyattn.launchers import cpu_softmax

# id: (batch, heads_q, heads_kv, seq_q, seq_k, head_dim)
SHAPES = {
    "prefill S=16, H=2": (1, 2, 2, 16, 16, 64),
    "decode GPT-2 small, 1k keys": (1, 12, 12, 1, 1024, 64),
    "decode GQA 32/8, 4k keys": (1, 32, 8, 1, 4096, 128),
}


def entry_points(q, k, v):
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty(q.shape[:-1] + (v.shape[-1],))
    lse = torch.empty(q.shape[:-1])
    scale = q.shape[-1] ** -0.5
    return {
        "torch SDPA": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa),
        "pyattn.attention": lambda: pyattn.attention(q, k, v),
        "pyattn.scaled_dot_product_attention": lambda: pyattn.scaled_dot_product_attention(q, k, v, enable_gqa=gqa),
        "launcher": lambda: cpu_softmax.softmax_forward(q, k, v, out, lse, scale=scale, causal=False, window_left=-1,
                                                        window_right=-1, softcap=0.0),
    }


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def measure(shape, rounds: int, calls: int) -> dict:
    batch, heads_q, heads_kv, seq_q, seq_k, dim = shape
    q = torch.randn(batch, heads_q, seq_q, dim)
    k, v = (torch.randn(batch, heads_kv, seq_k, dim) for _ in range(2))
    fns = entry_points(q, k, v)
    times = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            per_call_us(fn, 10)
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name].append(per_call_us(fn, calls))
    base = times["torch SDPA"]
    return dict(calls_us={name: statistics.median(ts) for name, ts in times.items()},
                sdpa_over={name: statistics.median(b / t for b, t in zip(base, ts)) for name, ts in times.items()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, shape in SHAPES.items():
        row = dict(case=name, shape=dict(zip(("batch", "heads_q", "heads_kv", "seq_q", "seq_k", "dim"), shape)))
        row.update(measure(shape, args.rounds, args.calls))
        rows.append(row)
        print(name + ": " + "; ".join(f"{n} {us:.0f} us ({row['sdpa_over'][n]:.2f}x SDPA)"
                                      for n, us in row["calls_us"].items()), flush=True)
    if args.json:
        record = dict(date=datetime.date.today().isoformat(), machine=cpu_model(), isa=pyattn._C.current_isa(),
                      threads=torch.get_num_threads(), torch=torch.__version__, pyattn=pyattn.__version__,
                      dtype="float32",
                      command=f"python bench/call_overhead.py --rounds {args.rounds} --calls {args.calls}",
                      rounds=args.rounds, load_average=list(os.getloadavg()), results=rows)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
