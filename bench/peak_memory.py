"""Peak extra host memory of one CPU attention call, against sequence length.

    python bench/peak_memory.py [--seqs 2048 4096 8192 16384] [--json bench/results/FILE.json]

Each (provider, seq) runs in a fresh child process: the inputs are made, the peak
resident set size is read (``ru_maxrss``), the call runs once, and the peak is read
again. The difference is what the call needed beyond its inputs: its outputs and
its scratch. A kernel that never forms the (Sq x Sk) score matrix grows linearly in
S; a naive one grows with S^2 (a single 8 x 16384 x 16384 float32 matrix is 8.6 GB).
"""
import argparse
import datetime
import json
import multiprocessing
import resource

import torch
import torch.nn.functional as F

PROVIDERS = ("pyattn-cpu", "sdpa")


def _measure(provider: str, seq: int, heads: int, dim: int, backward: bool, dtype: str, queue) -> None:
    try:
        queue.put(_extra_mib(provider, seq, heads, dim, backward, dtype))
    except Exception as error:  # the parent reports it instead of waiting forever
        queue.put(error)


def _extra_mib(provider: str, seq: int, heads: int, dim: int, backward: bool, dtype: str) -> float:
    import pyattn

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, dim, dtype=getattr(torch, dtype), requires_grad=backward)
               for _ in range(3))
    grad = torch.randn(1, heads, seq, dim, dtype=q.dtype)

    def call(q, k, v, grad):
        with torch.set_grad_enabled(backward):
            if provider == "pyattn-cpu":
                out = pyattn.attention(q, k, v, causal=True, backend="cpu")
            else:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if backward:
                out.backward(grad)

    # A first tiny call pays the one-time costs (lazy imports, thread pools) outside the measurement.
    call(*(x[:, :, :16].detach().requires_grad_(backward) for x in (q, k, v)), grad[:, :, :16])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call(q, k, v, grad)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024  # ru_maxrss is in KiB on Linux


def peak_extra_mib(provider: str, seq: int, heads: int, dim: int, backward: bool, dtype: str) -> float:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_measure, args=(provider, seq, heads, dim, backward, dtype, queue))
    child.start()
    result = queue.get()
    child.join()
    if isinstance(result, Exception):
        raise result
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for backward in (False, True):
        for seq in args.seqs:
            row = dict(seq=seq, backward=backward)
            inputs_mib = 3 * args.heads * seq * args.dim * torch.tensor([], dtype=getattr(torch, args.dtype)) \
                .element_size() / 2 ** 20
            for provider in PROVIDERS:
                row[provider] = peak_extra_mib(provider, seq, args.heads, args.dim, backward, args.dtype)
            row["inputs_mib"] = inputs_mib
            rows.append(row)
            print(f"{'fwd+bwd' if backward else 'fwd':7} S={seq:6}  inputs {inputs_mib:7.1f} MiB  " +
                  "  ".join(f"{p} +{row[p]:8.1f} MiB" for p in PROVIDERS), flush=True)
    if args.json:
        record = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                      shape=dict(batch=1, heads=args.heads, dim=args.dim, dtype=args.dtype, causal=True),
                      unit="MiB of peak RSS above the inputs", results=rows)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
