"""Softmax attention forward on CPU: pyattn's C++ kernel against torch SDPA, in one process.

    python -m pytest bench/bench_softmax.py --benchmark-only

Shapes from issue #3's CPU goal: B=1, H=8, S=2048, D=64, float32, torch's thread count.
FLOPs: 4*B*H*Sq*Sk*D forward, half when causal.
"""
import pytest
import torch
import torch.nn.functional as F

import pyattn

B, H, S, D = 1, 8, 2048, 64


def flops(causal: bool) -> float:
    return 4 * B * H * S * S * D / (2 if causal else 1)


PROVIDERS = {
    "pyattn-cpu": lambda q, k, v, causal: pyattn.attention(q, k, v, causal=causal, backend="cpu"),
    "torch-sdpa": lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_forward(benchmark, provider, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    fn = PROVIDERS[provider]
    with torch.no_grad():
        benchmark.pedantic(fn, args=(q, k, v, causal), rounds=15, warmup_rounds=2)
    benchmark.extra_info.update(shape=f"B{B}-H{H}-S{S}-D{D}-fp32", threads=torch.get_num_threads(),
                                gflops=flops(causal) / benchmark.stats["median"] / 1e9)
