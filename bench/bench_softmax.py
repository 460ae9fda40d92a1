"""Softmax attention on CPU: pyattn's C++ kernels against torch SDPA, in one process.

    python -m pytest bench/bench_softmax.py --benchmark-only

Shapes from issue #3's CPU goal: B=1, H=8, S=2048, D=64, torch's thread count; float32
forward, forward+backward, and bfloat16 forward. FLOPs: 4*B*H*Sq*Sk*D forward, 2.5x that
for the backward (five products instead of two), half when causal. For ratios on a noisy
machine, prefer bench/paired_ratio.py (alternating calls, median of paired ratios).
"""
import pytest
import torch
import torch.nn.functional as F

import pyattn

B, H, S, D = 1, 8, 2048, 64


def flops(causal: bool, backward: bool) -> float:
    return 4 * B * H * S * S * D / (2 if causal else 1) * (3.5 if backward else 1.0)


PROVIDERS = {
    "pyattn-cpu": lambda q, k, v, causal: pyattn.attention(q, k, v, causal=causal, backend="cpu"),
    "torch-sdpa": lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inputs(dtype, grad: bool):
    torch.manual_seed(0)
    return [torch.randn(B, H, S, D, dtype=dtype, requires_grad=grad) for _ in range(3)]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_forward(benchmark, provider, causal, dtype):
    q, k, v = inputs(DTYPES[dtype], grad=False)
    fn = PROVIDERS[provider]
    with torch.no_grad():
        benchmark.pedantic(fn, args=(q, k, v, causal), rounds=15, warmup_rounds=2)
    benchmark.extra_info.update(shape=f"B{B}-H{H}-S{S}-D{D}-{dtype}", threads=torch.get_num_threads(),
                                gflops=flops(causal, False) / benchmark.stats["median"] / 1e9)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_forward_backward(benchmark, provider, causal):
    q, k, v = inputs(torch.float32, grad=True)
    dout = torch.randn(B, H, S, D)
    fn = PROVIDERS[provider]

    def step():
        torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dout)

    benchmark.pedantic(step, rounds=7, warmup_rounds=1)
    benchmark.extra_info.update(shape=f"B{B}-H{H}-S{S}-D{D}-fp32", threads=torch.get_num_threads(),
                                gflops=flops(causal, True) / benchmark.stats["median"] / 1e9)
