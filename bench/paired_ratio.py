"""Median of paired speed ratios, pyattn CPU kernel vs torch SDPA, alternating in one process.

    python bench/paired_ratio.py [--seq 2048] [--rounds 21] [--json bench/results/FILE.json]

On a shared, noisy machine a ratio of two calls timed back to back is steadier than two
medians taken minutes apart; this is the number quoted in the README.
"""
import argparse
import datetime
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import pyattn


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, args.seq, args.dim) for _ in range(3))
    rows = []
    with torch.no_grad():
        for causal in (False, True):
            ours = lambda: pyattn.attention(q, k, v, causal=causal, backend="cpu")  # noqa: E731
            theirs = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
            for _ in range(2):
                ours(), theirs()
            pairs = [(timed(ours), timed(theirs)) for _ in range(args.rounds)]
            flops = 4 * args.batch * args.heads * args.seq ** 2 * args.dim / (2 if causal else 1)
            row = dict(causal=causal, pyattn_ms=1e3 * statistics.median(p[0] for p in pairs),
                       sdpa_ms=1e3 * statistics.median(p[1] for p in pairs),
                       speedup_median_of_ratios=statistics.median(p[1] / p[0] for p in pairs))
            row["pyattn_gflops"] = flops / row["pyattn_ms"] / 1e6
            rows.append(row)
            print(f"causal={causal!s:5}  pyattn {row['pyattn_ms']:7.2f} ms ({row['pyattn_gflops']:.0f} GFLOP/s)  "
                  f"sdpa {row['sdpa_ms']:7.2f} ms  speedup (median of paired ratios) "
                  f"{row['speedup_median_of_ratios']:.2f}x")
    if args.json:
        record = dict(date=datetime.date.today().isoformat(), machine=cpu_name(),
                      threads=torch.get_num_threads(), torch=torch.__version__, pyattn=pyattn.__version__,
                      shape=dict(batch=args.batch, heads=args.heads, seq=args.seq, dim=args.dim, dtype="float32"),
                      rounds=args.rounds, results=rows)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
