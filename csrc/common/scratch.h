// Scratch memory and thread counts of the CPU kernels' dispatchers (softmax and linear).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

namespace pyattn {
namespace cpu {

struct FreeDeleter {
  void operator()(void* ptr) const { std::free(ptr); }
};
using Buffer = std::unique_ptr<float, FreeDeleter>;

// n floats (at least 16), 64-byte aligned.
inline Buffer aligned_floats(size_t n) {
  void* raw = nullptr;
  if (posix_memalign(&raw, 64, std::max<size_t>(n, 16) * sizeof(float)) != 0) {
    throw std::bad_alloc();
  }
  return Buffer(static_cast<float*>(raw));
}

// Per-worker scratch stride: a 64-byte multiple plus one cache line apart.
inline size_t worker_stride(size_t floats) { return (floats + 15) / 16 * 16 + 16; }

// Threads worth waking for a problem of `flops` arithmetic that streams `bytes` of memory:
// waking a worker costs a few microseconds, so each one should get ~40 us of work. Estimated
// from one core's rates measured on the 2-core AVX2 machine that CI runs on: ~50 GFLOP/s in
// the blocked products, ~18 GB/s reading keys and values that are not in its cache (what
// bounds decoding, where a few queries see every key once: 4 MB of them took one thread
// 230 us and two 117 us).
inline int thread_count(int num_threads, double flops, double bytes, int64_t n_items) {
  const double worth = flops / 2e6 + bytes / 0.72e6;
  const double threads = std::min<double>(std::max(1, num_threads), std::max(1.0, worth));
  const int64_t whole = static_cast<int64_t>(threads);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(whole, n_items)));
}

}  // namespace cpu
}  // namespace pyattn
