"""Softmax attention on CPU: pyattn's C++ kernels against torch SDPA, in one process.

    python -m pytest bench/bench_softmax.py --benchmark-only              # CPU (GPU cases skip)
    python -m pytest bench/bench_softmax.py -m gpu --benchmark-only \
        --benchmark-json bench/results/gpu_softmax_DATE.json               # on a GPU machine

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


# --------------------------------------------------------------------------- GPU
# Issue #3's GPU goal: H100, bfloat16, D=128, B*S=16k tokens, S from 1k to 16k, causal and not;
# pyattn's Triton kernels beside each torch SDPA backend, forward and backward, in one run.
GPU_SEQS = [1024, 2048, 4096, 8192, 16384]
GPU_TOKENS, GPU_HEADS, GPU_DIM = 16384, 16, 128
GPU_PROVIDERS = {
    "pyattn-triton": lambda q, k, v, causal: pyattn.attention(q, k, v, causal=causal, backend="triton"),
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
}


def _gpu_call(provider):
    entry = GPU_PROVIDERS[provider]
    if callable(entry):
        return entry
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call(q, k, v, causal):
        with sdpa_kernel(getattr(SDPBackend, entry)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return call


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seq", GPU_SEQS)
@pytest.mark.parametrize("provider", list(GPU_PROVIDERS))
def test_gpu(benchmark, provider, seq, causal, mode):
    batch = GPU_TOKENS // seq
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, GPU_HEADS, seq, GPU_DIM, device="cuda", dtype=torch.bfloat16,
                           requires_grad=mode != "fwd") for _ in range(3))
    fn = _gpu_call(provider)
    try:
        out = fn(q, k, v, causal)
    except RuntimeError as error:  # an SDPA backend that does not take these inputs here
        pytest.skip(f"{provider}: {error}")
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(q, k, v, causal)
            torch.cuda.synchronize()
    else:
        dout = torch.randn_like(out)

        def step():
            # forward + backward (3.5x the forward's FLOPs); the backward alone is the difference with "fwd"
            torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dout)
            torch.cuda.synchronize()
    benchmark.pedantic(step, rounds=20, warmup_rounds=3)
    flop = 4 * batch * GPU_HEADS * seq * seq * GPU_DIM / (2 if causal else 1) * (3.5 if mode != "fwd" else 1.0)
    benchmark.extra_info.update(shape=f"B{batch}-H{GPU_HEADS}-S{seq}-D{GPU_DIM}-bf16", mode=mode,
                                device=torch.cuda.get_device_name(),
                                tflops=flop / benchmark.stats["median"] / 1e12)
