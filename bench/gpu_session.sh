#!/usr/bin/env bash
# Everything a session with a lent GPU runs first, in one command (about 10-15 minutes on an H100):
# build with CUDA for this GPU, the whole GPU test suite (recording which CUDA C++ kernels passed it
# and compute-sanitizer), then the GPU benchmarks of every backend beside torch SDPA, and the record
# of where the CUDA kernels beat Triton. Results land in bench/results/ (commit them, then run
# `python bench/render_readme.py`) and pyattn/dispatch/cuda_verified.json.
#
#   bash bench/gpu_session.sh [ARCH]     # ARCH: CUDA architecture to build (default 90a, H100)
set -uo pipefail
cd "$(dirname "$0")/.."
arch="${1:-90a}"
day="$(date -u +%F)"
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9_.-')"
out="bench/results"
mkdir -p "$out"

PYATTN_CUDA_ARCHS="$arch" pip install --no-build-isolation --no-deps -e . -q || exit 1

# 1. correctness: every backend's GPU tests; the CUDA kernels' outcomes go to the verification record
python -m pytest -m gpu --record-cuda-verification -p no:cacheprovider -q \
  --junitxml="$out/gpu_tests_${gpu}_${day}.xml" 2>&1 | tail -40 | tee "$out/gpu_tests_${gpu}_${day}.txt"

# 2. speed: pytest-benchmark files, then pyattn-bench per family (cuda, triton, torch SDPA backends, others)
python -m pytest bench/bench_softmax.py bench/bench_providers.py -m gpu --benchmark-only -q \
  --benchmark-json "$out/gpu_pytest-benchmark_${gpu}_${day}.json" 2>&1 | tail -5
seqs="1024,2048,4096,8192,16384"
plot() { python -c "import matplotlib" 2>/dev/null && echo "--plot $1"; }  # the GPU machine may lack it
for family in softmax linear; do
  pyattn-bench "$family" --device cuda --dtype bfloat16 --dim 128 --tokens 16384 --seqlens "$seqs" \
    --heads 16/16 --causal both --pass fwd,bwd --json "$out/pyattn-bench_${family}_${gpu}_${day}.json" \
    $(plot "$out/pyattn-bench_${family}_${gpu}_${day}.png")
done
pyattn-bench decode --device cuda --dtype bfloat16 --dim 128 --heads 32/8 --batch 8 \
  --seqlens 4096,16384,65536,262144 --json "$out/pyattn-bench_decode_${gpu}_${day}.json" \
  $(plot "$out/pyattn-bench_decode_${gpu}_${day}.png")

# 3. where the CUDA C++ kernels that passed step 1 beat Triton (backend=None reads this)
python bench/record_cuda_speed.py "$out"/pyattn-bench_{softmax,linear,decode}_"${gpu}_${day}".json
git status --short "$out" pyattn/dispatch/cuda_verified.json
