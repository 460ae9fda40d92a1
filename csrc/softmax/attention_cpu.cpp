// Dispatcher of the CPU softmax attention forward: picks the block kernel for this CPU,
// cuts the problem into blocks of queries, and runs them on the thread pool.

#include "attention_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "../common/parallel.h"

namespace pyattn {
namespace cpu {
namespace {

#if defined(PYATTN_HAVE_AVX2)
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

#if defined(PYATTN_HAVE_AVX512)
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
#endif

std::atomic<const IsaKernel*> g_forced{nullptr};

const IsaKernel& best_kernel() {
  const IsaKernel* kernels[3];
  available_isas(kernels, 3);
  return *kernels[0];
}

const IsaKernel& kernel() {
  const IsaKernel* forced = g_forced.load(std::memory_order_acquire);
  if (forced != nullptr) return *forced;
  static const IsaKernel& best = best_kernel();
  return best;
}

struct Job {
  const SoftmaxFwdParams* p;
  const IsaKernel* kernel;
  float* scratch;
  size_t scratch_stride;  // floats per worker
  bool fused_heads;       // blocks hold several heads of a group (short Sq)
  int64_t group, blocks_per_head, heads_per_block, blocks_per_group;
};

void run_item(void* ctx, int64_t item, int worker) {
  const Job& job = *static_cast<const Job*>(ctx);
  const SoftmaxFwdParams& p = *job.p;
  const int64_t rows = job.kernel->block_rows;
  BlockTask t;
  if (job.fused_heads) {
    const int64_t gb = item % job.blocks_per_group, rest = item / job.blocks_per_group;
    t.batch = rest / p.heads_kv;
    t.kv_head = rest % p.heads_kv;
    t.h_first = t.kv_head * job.group + gb * job.heads_per_block;
    t.n_heads = std::min(job.heads_per_block, job.group - gb * job.heads_per_block);
    t.i_first = 0;
    t.n_i = p.seq_q;
  } else {
    // Last query blocks first: under a causal mask they are the most expensive, and
    // the pool hands items out in order, so the cheap ones fill the gaps at the end.
    const int64_t bh = p.batch * p.heads_q;
    const int64_t qb = job.blocks_per_head - 1 - item / bh, rest = item % bh;
    t.batch = rest / p.heads_q;
    t.h_first = rest % p.heads_q;
    t.kv_head = t.h_first / job.group;
    t.n_heads = 1;
    t.i_first = qb * rows;
    t.n_i = std::min(rows, p.seq_q - t.i_first);
  }
  job.kernel->run_block(p, t, job.scratch + worker * job.scratch_stride);
}

struct FreeDeleter {
  void operator()(float* ptr) const { std::free(ptr); }
};

}  // namespace

int available_isas(const IsaKernel* out[], int capacity) {
  int n = 0;
#if defined(PYATTN_HAVE_AVX512)
  if (n < capacity && cpu_has_avx512()) out[n++] = &softmax_fwd_kernel_avx512();
#endif
#if defined(PYATTN_HAVE_AVX2)
  if (n < capacity && cpu_has_avx2()) out[n++] = &softmax_fwd_kernel_avx2();
#endif
  if (n < capacity) out[n++] = &softmax_fwd_kernel_base();
  return n;
}

bool set_isa(const char* name) {
  if (name == nullptr || name[0] == '\0') {
    g_forced.store(nullptr, std::memory_order_release);
    return true;
  }
  const IsaKernel* kernels[3];
  const int n = available_isas(kernels, 3);
  for (int i = 0; i < n; ++i) {
    if (std::strcmp(kernels[i]->name, name) == 0) {
      g_forced.store(kernels[i], std::memory_order_release);
      return true;
    }
  }
  return false;
}

const char* current_isa() { return kernel().name; }

const char* forced_isa() {
  const IsaKernel* forced = g_forced.load(std::memory_order_acquire);
  return forced != nullptr ? forced->name : "";
}

void softmax_fwd(const SoftmaxFwdParams& p, int num_threads) {
  if (p.batch <= 0 || p.heads_q <= 0 || p.seq_q <= 0 || p.heads_kv <= 0) return;
  const IsaKernel& k = kernel();
  const int64_t rows = k.block_rows;

  Job job;
  job.p = &p;
  job.kernel = &k;
  job.group = p.heads_q / p.heads_kv;
  job.fused_heads = job.group > 1 && p.seq_q * 2 <= rows;
  int64_t n_items;
  if (job.fused_heads) {
    job.heads_per_block = std::min(job.group, rows / p.seq_q);
    job.blocks_per_group = (job.group + job.heads_per_block - 1) / job.heads_per_block;
    n_items = p.batch * p.heads_kv * job.blocks_per_group;
  } else {
    job.blocks_per_head = (p.seq_q + rows - 1) / rows;
    n_items = p.batch * p.heads_q * job.blocks_per_head;
  }

  // Waking a worker costs a few microseconds: small problems stay on fewer threads.
  const double flops = 2.0 * static_cast<double>(p.batch * p.heads_q) * p.seq_q *
                       static_cast<double>(p.seq_k) * static_cast<double>(p.head_dim + p.head_dim_v);
  int threads = std::max(1, num_threads);
  threads = static_cast<int>(std::min<double>(threads, std::max(1.0, flops / 2e6)));
  threads = static_cast<int>(std::min<int64_t>(threads, n_items));

  // Per-worker scratch, padded to a 64-byte multiple plus one cache line apart.
  job.scratch_stride = (k.scratch_floats(p.head_dim, p.head_dim_v) + 15) / 16 * 16 + 16;
  void* raw = nullptr;
  if (posix_memalign(&raw, 64, job.scratch_stride * threads * sizeof(float)) != 0) throw std::bad_alloc();
  std::unique_ptr<float, FreeDeleter> scratch(static_cast<float*>(raw));
  job.scratch = scratch.get();

  parallel_for(n_items, threads, &run_item, &job);
}

}  // namespace cpu
}  // namespace pyattn
