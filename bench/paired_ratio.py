"""Median of paired speed ratios, pyattn CPU kernel vs torch SDPA, alternating in one process.

    python bench/paired_ratio.py [--seq 2048] [--rounds 21] [--cases fwd-fp32 fwdbwd-fp32 fwd-bf16 ...]
                                 [--isa avx2] [--json bench/results/FILE.json]

Cases: ``<pass>-<dtype>`` with pass ``fwd`` (inference, no autograd) or ``fwdbwd`` (forward
and backward of out.sum-like loss through autograd), dtype fp32 / bf16 / fp16; each is run
non-causal and causal. On a shared, noisy machine a ratio of two calls timed back to back
is steadier than two medians taken minutes apart; this is the number quoted in the README.
To compare AVX2 kernels on an AVX-512 machine, hold torch to AVX2 as well:
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/paired_ratio.py --isa avx2``
(the record keeps those variables).
"""
import argparse
import datetime
import importlib
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import pyattn
from pyattn.bench.results import cpu_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What holds torch's CPU kernels to a lower instruction set: its own vectorized ops, oneDNN, MKL.
TORCH_ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
CASES = ("fwd-fp32", "fwdbwd-fp32", "fwd-bf16", "fwdbwd-bf16")




def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def providers(q, k, v, dout, causal: bool, backward: bool):
    """(pyattn, sdpa) callables for one case."""
    ours = lambda: pyattn.attention(q, k, v, causal=causal, backend="cpu")  # noqa: E731
    theirs = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    if not backward:
        def no_grad(fn):
            def run():
                with torch.no_grad():
                    fn()
            return run
        return no_grad(ours), no_grad(theirs)

    def with_backward(fn):
        def run():
            torch.autograd.grad(fn(), (q, k, v), dout)
        return run
    return with_backward(ours), with_backward(theirs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--cases", nargs="+", default=["fwd-fp32"], choices=[
        f"{p}-{d}" for p in ("fwd", "fwdbwd") for d in DTYPES])
    parser.add_argument("--isa", help="pyattn's CPU kernels for this instruction set (pyattn._C.set_isa), "
                        "e.g. avx2 on an AVX-512 machine (hold torch to it with " + ", ".join(TORCH_ISA_ENV) + ")")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.isa:
        importlib.import_module("pyattn._C").set_isa(args.isa)
    torch.manual_seed(0)
    rows = []
    for case in args.cases:
        kind, dtype_name = case.split("-")
        backward = kind == "fwdbwd"
        dtype = DTYPES[dtype_name]
        q, k, v = (torch.randn(args.batch, args.heads, args.seq, args.dim, dtype=dtype, requires_grad=backward)
                   for _ in range(3))
        dout = torch.randn(args.batch, args.heads, args.seq, args.dim, dtype=dtype)
        for causal in (False, True):
            ours, theirs = providers(q, k, v, dout, causal, backward)
            for _ in range(2):
                ours(), theirs()
            pairs = [(timed(ours), timed(theirs)) for _ in range(args.rounds)]
            # forward 4*B*H*S^2*D, backward 2.5x that (5 products instead of 2); half when causal
            flops = 4 * args.batch * args.heads * args.seq ** 2 * args.dim / (2 if causal else 1)
            flops *= 3.5 if backward else 1.0
            row = dict(case=case, causal=causal, pyattn_ms=1e3 * statistics.median(p[0] for p in pairs),
                       sdpa_ms=1e3 * statistics.median(p[1] for p in pairs),
                       speedup_median_of_ratios=statistics.median(p[1] / p[0] for p in pairs))
            row["pyattn_gflops"] = flops / row["pyattn_ms"] / 1e6
            rows.append(row)
            print(f"{case:12} causal={causal!s:5}  pyattn {row['pyattn_ms']:7.2f} ms ({row['pyattn_gflops']:.0f} "
                  f"GFLOP/s)  sdpa {row['sdpa_ms']:7.2f} ms  speedup (median of paired ratios) "
                  f"{row['speedup_median_of_ratios']:.2f}x", flush=True)
    if args.json:
        record = dict(date=datetime.date.today().isoformat(), machine=cpu_model(),
                      isa=pyattn._C.current_isa(), threads=torch.get_num_threads(), torch=torch.__version__,
                      torch_env={k: os.environ[k] for k in TORCH_ISA_ENV if k in os.environ},
                      pyattn=pyattn.__version__,
                      shape=dict(batch=args.batch, heads=args.heads, seq=args.seq, dim=args.dim),
                      rounds=args.rounds, results=rows)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
