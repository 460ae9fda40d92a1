"""``pyattn-bench``: which attention kernel is fastest for my shapes, here, and how fast is it.

Examples::

    pyattn-bench softmax --providers all --seqlens 512,1024,2048 --plot out.png --json out.json
    pyattn-bench softmax --providers pyattn-cpu,sdpa-flash --causal both --pass fwd,fwd+bwd
    pyattn-bench linear --seqlens 1024,4096 --heads 8/2 --dtype bfloat16
    pyattn-bench decode --seqlen-q 1 --seqlens 4096,16384 --device cuda      # GB/s too
    pyattn-bench cross --seqlen-q 256 --seqlens 8192,65536
    pyattn-bench softmax --list                                             # providers and why not

Prints which providers can run (the others with the reason), then one table per
(shape, dtype, causal, pass): median ms, its interquartile range, TFLOP/s (one FLOP
formula per family, `pyattn.bench.flops`), GB/s for the memory-bound families
(decode, cross), peak memory of one call, and the speed ratio against the baseline
provider (``--baseline``; ratio = baseline ms / provider ms, above 1 is faster).
Each provider is checked against `pyattn.reference` on the first shape before it is
timed. ``--json`` writes every result with the machine, versions and date
(`pyattn.bench.results`); ``--plot`` draws TFLOP/s against sequence length.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List, Optional, Sequence

import torch

from . import registry
from .case import DTYPES, Shape
from .families import FAMILIES
from .flops import PASSES
from .progress import Progress
from .results import make_record, write
from .runner import Settings, add_ratios, probe_all, run
from .table import providers_table, result_tables


def _ints(text: str) -> List[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> List[str]:
    return [x for x in text.replace(" ", "").split(",") if x]


def _heads(text: str):
    parts = text.split("/")
    try:
        hq, hkv = int(parts[0]), int(parts[-1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"--heads takes H or Hq/Hkv, got {text!r}") from None
    if len(parts) > 2 or hq <= 0 or hkv <= 0 or hq % hkv:
        raise argparse.ArgumentTypeError(f"--heads takes H or Hq/Hkv with Hq a multiple of Hkv, got {text!r}")
    return hq, hkv


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyattn-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("family", choices=sorted(FAMILIES), help="op family")
    p.add_argument("--list", action="store_true", help="list the providers (available or why not) and exit")
    p.add_argument("--providers", type=_names, default=["all"], help="comma-separated names, or all (default)")
    p.add_argument("--exclude", type=_names, default=[], help="comma-separated providers to leave out")
    p.add_argument("--baseline", help="provider the ratio column compares with (default: torch SDPA's fastest "
                                      "backend that ran; torch-chunked for linear)")
    shapes = p.add_argument_group("shapes")
    shapes.add_argument("--batch", type=int, help="batch size (default 1, or from --tokens)")
    shapes.add_argument("--tokens", type=int, help="batch = max(1, tokens // seqlen): constant work per shape "
                                                   "(default on CUDA: 16384)")
    shapes.add_argument("--heads", type=_heads, default=(8, 8), help="H, or Hq/Hkv for GQA (default 8)")
    shapes.add_argument("--seqlens", type=_ints, help="sequence lengths S (keys for decode/cross); default "
                                                      "512,1024,2048 on CPU, 1024..16384 on CUDA")
    shapes.add_argument("--seqlen-q", type=int, help="query length for decode (default 1) and cross (default 256)")
    shapes.add_argument("--dim", type=int, default=64, help="head dim D (default 64)")
    shapes.add_argument("--dim-v", type=int, help="value head dim (default D)")
    what = p.add_argument_group("what to run")
    what.add_argument("--dtype", type=_names, help=f"comma-separated, of {list(DTYPES)} "
                                                   "(default float32 on CPU, bfloat16 on CUDA)")
    what.add_argument("--causal", nargs="?", const="true", choices=["true", "false", "both"],
                      help="causal masking (default: the family's; softmax false, linear/decode true)")
    what.add_argument("--no-causal", dest="causal", action="store_const", const="false")
    what.add_argument("--pass", dest="passes", type=_names, default=["fwd"],
                      help=f"comma-separated, of {list(PASSES)} (default fwd)")
    what.add_argument("--device", help="cpu, cuda or cuda:N (default cuda when there is one)")
    timing = p.add_argument_group("timing")
    timing.add_argument("--reps", type=int, help="most timed calls per measurement (default 15 CPU, 100 CUDA)")
    timing.add_argument("--min-reps", type=int, default=3, help="fewest timed calls (default 3)")
    timing.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    timing.add_argument("--time-budget", type=float, help="seconds per measurement after which timing stops "
                                                          "once --min-reps are done (default 1.5 CPU, 1 CUDA)")
    timing.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads; default torch's)")
    timing.add_argument("--no-flush-l2", action="store_true", help="CUDA: do not flush L2 before each call")
    timing.add_argument("--no-check", action="store_true", help="skip the correctness check on the first shape")
    timing.add_argument("--check-max-seq", type=int, default=1024,
                        help="the check cuts the first shape's sequences to this (default 1024)")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write every result, the machine, versions and date")
    out.add_argument("--no-times", action="store_true", help="leave each call's time out of the JSON")
    out.add_argument("--plot", metavar="FILE.png", help="TFLOP/s against sequence length (needs matplotlib)")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _shapes(args, family, device) -> List[Shape]:
    fam = FAMILIES[family]
    seqlens = args.seqlens or ([1024, 2048, 4096, 8192, 16384] if device.type == "cuda" else [512, 1024, 2048])
    tokens = args.tokens if args.tokens is not None else (16384 if device.type == "cuda" and args.batch is None
                                                          else None)
    hq, hkv = args.heads
    seq_q_fixed = args.seqlen_q if args.seqlen_q is not None else fam.default_seqlen_q
    out = []
    for s in seqlens:
        batch = args.batch if args.batch is not None else (max(1, tokens // s) if tokens else 1)
        seq_q = seq_q_fixed if seq_q_fixed else s
        out.append(Shape(batch, hq, hkv, seq_q, s, args.dim, args.dim_v or args.dim))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    family = args.family
    fam = FAMILIES[family]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    try:
        chosen = registry.select(family, args.providers, args.exclude)
    except ValueError as error:
        p.error(str(error))
    if args.list:
        print(providers_table(probe_all(registry.providers(family), device)))
        return 0
    if args.baseline and args.baseline not in {x.name for x in registry.providers(family)}:
        p.error(f"--baseline {args.baseline!r} is not a {family} provider")
    if args.seqlen_q is not None and not fam.default_seqlen_q:
        p.error(f"--seqlen-q is for decode and cross ({family} uses Sq = Sk = S)")
    for name in args.passes:
        if name not in PASSES:
            p.error(f"--pass takes {list(PASSES)}, got {name!r}")
    dtype_names = args.dtype or (["bfloat16"] if device.type == "cuda" else ["float32"])
    for name in dtype_names:
        if name not in DTYPES:
            p.error(f"--dtype takes {list(DTYPES)}, got {name!r}")
    causal = args.causal or ("true" if fam.default_causal else "false")
    causals = {"true": [True], "false": [False], "both": [False, True]}[causal]
    if any(c not in fam.causal_choices for c in causals):
        p.error(f"{family} takes causal={list(fam.causal_choices)}")
    if args.plot:
        from .plot import require_matplotlib
        try:
            require_matplotlib()
        except ImportError as error:
            p.error(str(error))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    on_cuda = device.type == "cuda"
    settings = Settings(warmup=args.warmup, reps=args.reps or (100 if on_cuda else 15), min_reps=args.min_reps,
                        budget_s=args.time_budget if args.time_budget is not None else (1.0 if on_cuda else 1.5),
                        flush_l2=not args.no_flush_l2, check=not args.no_check, check_max_seq=args.check_max_seq,
                        keep_times=not args.no_times)
    shapes = _shapes(args, family, device)
    dtypes = [DTYPES[n] for n in dtype_names]

    statuses = probe_all(chosen, device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"pyattn-bench {family} on {device} ({torch.get_num_threads()} CPU threads"
          + (f", load average {load:.1f}" if load is not None else "") + f"), torch {torch.__version__}")
    if device.type == "cpu" and load is not None and load > (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs: other work is running, so CPU timings "
              "will be slow and noisy (the JSON records the load)", file=sys.stderr)
    print(providers_table(statuses), flush=True)
    total = len(shapes) * len(dtypes) * len(causals) * len(args.passes) * len(chosen)
    progress = Progress(total, enabled=not args.quiet)
    try:
        statuses, rows = run(family, chosen, shapes, dtypes, causals, args.passes, device, settings, progress)
    finally:
        progress.close()
    add_ratios(rows, family, args.baseline)
    print()
    print(result_tables(rows, fam.memory_bound, {s["name"] for s in statuses if s["reason"]}))
    record = make_record(command=" ".join(["pyattn-bench"] + [shlex.quote(a) for a in argv]),
                         args={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
                         family=family, device=device, providers=statuses, results=rows)
    if args.json:
        write(record, args.json)
        print(f"\nwrote {args.json}")
    if args.plot:
        from .plot import plot
        plot(record, args.plot)
        print(f"wrote {args.plot}")
    return 0
