"""pyattn-bench: attention microbenchmarks over a registry of providers (``python -m pyattn.bench``).

* `pyattn.bench.cli`: the command (options, tables, --json, --plot);
* `pyattn.bench.registry`: the providers per op family;
* `pyattn.bench.families`: the families (op, reference, inputs, defaults);
* `pyattn.bench.flops`: one FLOP (and byte) formula per family;
* `pyattn.bench.runner`: correctness check on the first shape, then timing;
* `pyattn.bench.timing`: CUDA events / perf_counter, L2 flush, peak memory;
* `pyattn.bench.results`: the JSON schema; `pyattn.bench.plot`: the PNG.
"""
from .case import Case, Shape
from .cli import main
from .registry import Provider, Unsupported

__all__ = ["Case", "Shape", "Provider", "Unsupported", "main"]
