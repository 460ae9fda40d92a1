// CPU fused softmax attention forward (float32): the interface between the dispatcher
// (attention_cpu.cpp) and the per-ISA block kernels (attention_cpu_<isa>.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include "params.h"

namespace pyattn {
namespace cpu {

// One unit of parallel work: rows of queries that share one kv head and are processed
// together. Row r is query i_first + r % n_i of head h_first + r / n_i, so a block is
// either a run of queries of one head, or (short Sq with GQA) the same queries of several
// heads of one group, which then share every key and value load.
struct BlockTask {
  int64_t batch, kv_head, h_first, n_heads, i_first, n_i;
};

struct IsaKernel {
  const char* name;
  int block_rows;  // most rows in one BlockTask
  size_t (*scratch_floats)(int64_t head_dim, int64_t head_dim_v);  // per worker, 64-byte aligned
  void (*run_block)(const SoftmaxFwdParams& p, const BlockTask& task, float* scratch);
};

// Each is defined in its own translation unit, compiled for that instruction set.
const IsaKernel& softmax_fwd_kernel_base();
#if defined(PYATTN_HAVE_AVX2)
const IsaKernel& softmax_fwd_kernel_avx2();
#endif
#if defined(PYATTN_HAVE_AVX512)
const IsaKernel& softmax_fwd_kernel_avx512();
#endif

// Kernels this machine can run, best first.
int available_isas(const IsaKernel* out[], int capacity);

// Selects the kernel by name ("" = best available); returns false if unknown here.
bool set_isa(const char* name);
const char* forced_isa();  // "" when the best available one is used
const char* current_isa();

// Runs the whole forward on up to num_threads threads. p.q/k/v/out point to float32.
void softmax_fwd(const SoftmaxFwdParams& p, int num_threads);

}  // namespace cpu
}  // namespace pyattn
