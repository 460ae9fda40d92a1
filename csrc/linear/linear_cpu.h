// CPU linear-recurrent attention, forward and backward: the interface between the
// dispatcher (linear_cpu.cpp) and the per-ISA head kernels (linear_cpu_<isa>.cpp).
//
// One unit of work is one (batch, query head): its whole sequence, chunk after chunk,
// carrying the float32 state (S, z) from one chunk to the next.
#pragma once

#include <cstddef>
#include <cstdint>

#include "linear_params.h"

namespace pyattn {
namespace cpu {

struct LinearIsaKernel {
  const char* name;  // the softmax kernels' names: "avx512", "avx2", "base"
  size_t (*fwd_scratch_floats)(const LinearFwdParams& p);  // per worker, 64-byte aligned
  void (*fwd_head)(const LinearFwdParams& p, int64_t b, int64_t h, float* scratch);
  size_t (*bwd_scratch_floats)(const LinearBwdParams& p);
  // dk_part / dv_part: when not null (GQA), this head's float32 contributions to dk / dv,
  // rows (S, F) / (S, Dv) contiguous, instead of writing p.dk / p.dv.
  void (*bwd_head)(const LinearBwdParams& p, int64_t b, int64_t h, float* scratch, float* dk_part,
                   float* dv_part);
  // float32 rows (ld apart) * mul -> dst[r * rs + c * cs] in dtype (0 float32, 1 float16, 2 bfloat16).
  void (*store_rows)(int dtype, void* dst, int64_t rs, int64_t cs, const float* src, int64_t ld,
                     int64_t rows, int64_t cols, float mul);
};

const LinearIsaKernel& linear_kernel_base();
#if defined(PYATTN_HAVE_AVX2)
const LinearIsaKernel& linear_kernel_avx2();
#endif
#if defined(PYATTN_HAVE_AVX512)
const LinearIsaKernel& linear_kernel_avx512();
#endif

// The variant in use: the one forced with set_isa (attention_cpu.h) when this family has
// it, else the best this CPU runs.
const LinearIsaKernel& linear_kernel();

// Whole forward / backward on up to num_threads threads.
void linear_fwd(const LinearFwdParams& p, int num_threads);
void linear_bwd(const LinearBwdParams& p, int num_threads);

}  // namespace cpu
}  // namespace pyattn
