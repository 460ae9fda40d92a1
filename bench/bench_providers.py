"""Every provider of every family from the pyattn-bench registry, as pytest-benchmark tests.

    python -m pytest bench/bench_providers.py --benchmark-only                 # CPU shapes
    python -m pytest bench/bench_providers.py --benchmark-only -k "softmax and fwd-"
    python -m pytest bench/bench_providers.py -m gpu --benchmark-only          # CUDA shapes

The same registry, inputs, correctness check and FLOP formulas as ``pyattn-bench``
(`pyattn.bench`): a provider that cannot run here is skipped with the reason, one that
fails the check against `pyattn.reference` fails the test. Not part of the default test
run (``testpaths = ["tests"]``). For sweeps, tables, JSON and plots use ``pyattn-bench``.
"""
import pytest
import torch

from pyattn.bench import registry
from pyattn.bench.case import Case, Shape
from pyattn.bench.flops import flops
from pyattn.bench.runner import Failed, Skipped, prepare

# one mid-size shape per family: seconds per provider on a 2-core CPU; an H100 bf16 shape for -m gpu
CPU_SHAPES = {
    "softmax": Shape(1, 8, 8, 1024, 1024, 64, 64),
    "linear": Shape(1, 8, 8, 1024, 1024, 64, 64),
    "decode": Shape(1, 8, 2, 1, 16384, 64, 64),
    "cross": Shape(1, 8, 8, 256, 8192, 64, 64),
}
GPU_SHAPES = {
    "softmax": Shape(4, 16, 16, 4096, 4096, 128, 128),
    "linear": Shape(4, 16, 16, 4096, 4096, 128, 128),
    "decode": Shape(16, 32, 8, 1, 32768, 128, 128),
    "cross": Shape(16, 16, 16, 512, 65536, 128, 128),
}
CAUSAL = {"softmax": True, "linear": True, "decode": True, "cross": False}
PASSES = ["fwd", "fwd+bwd"]
CASES = [(family, provider.name, pass_) for family in CPU_SHAPES for provider in registry.providers(family)
         for pass_ in PASSES]


def _bench(benchmark, family, provider_name, pass_, device, dtype, shape, rounds):
    provider = registry.select(family, [provider_name])[0]
    case = Case(family, shape, dtype, CAUSAL[family], pass_, device)
    try:
        step = prepare(provider, case, check_first=True)
    except Skipped as reason:
        pytest.skip(f"{provider_name}: {reason}")
    except Failed as reason:
        pytest.fail(f"{provider_name}: {reason}")
    if device.type == "cuda":
        def timed():
            step()
            torch.cuda.synchronize()
    else:
        timed = step
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2)
    benchmark.extra_info.update(shape=shape.id, dtype=str(dtype).replace("torch.", ""), causal=case.causal,
                                threads=torch.get_num_threads(),
                                tflops=flops(family, shape, case.causal, pass_) / benchmark.stats["median"] / 1e12)


@pytest.mark.parametrize("family, provider_name, pass_", CASES, ids=[f"{f}-{p}-{x}" for f, p, x in CASES])
def test_cpu(benchmark, family, provider_name, pass_):
    _bench(benchmark, family, provider_name, pass_, torch.device("cpu"), torch.float32, CPU_SHAPES[family], 7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family, provider_name, pass_", CASES, ids=[f"{f}-{p}-{x}" for f, p, x in CASES])
def test_gpu(benchmark, family, provider_name, pass_):
    _bench(benchmark, family, provider_name, pass_, torch.device("cuda"), torch.bfloat16, GPU_SHAPES[family], 20)
