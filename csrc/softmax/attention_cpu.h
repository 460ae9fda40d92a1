// CPU fused softmax attention, forward and backward: the interface between the dispatcher
// (attention_cpu.cpp) and the per-ISA block kernels (attention_cpu_<isa>.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include "params.h"

namespace pyattn {
namespace cpu {

// One unit of parallel work of the forward: rows of queries that share one kv head and are
// processed together. Row r is query i_first + r % n_i of head h_first + r / n_i, so a block
// is either a run of queries of one head, or (short Sq with GQA) the same queries of several
// heads of one group, which then share every key and value load.
//
// With few blocks (decoding), the keys are split too: a task then only sees keys
// [key_begin, key_end) and writes its rows' partial results, normalized, to `partial`
// (float32: rows x head_dim_v outputs, then rows lse), which merge_splits combines.
struct BlockTask {
  int64_t batch, kv_head, h_first, n_heads, i_first, n_i;
  int64_t key_begin = 0, key_end = INT64_MAX;
  float* partial = nullptr;
};

// Buffers of the backward shared by all workers, all float32 and 64-byte aligned. The
// queries of (batch b, head h) are cut into tiles of bwd_rows rows; tile qb of them has index
//   tile_base[b] * heads_q + h * (tile_base[b + 1] - tile_base[b]) + qb,
// so the tiles of one kv-head group are contiguous (tile_base has batch + 1 entries).
struct BwdWorkspace {
  const int64_t* tile_base;
  int64_t dp, dvp;  // head_dim, head_dim_v rounded up to 16 (whole vectors on every ISA)
  float* qn;        // per tile [rows][dp]: q, unscaled
  float* don;       // per tile [rows][dvp]: dout
  float* lse2;      // per tile [rows]: lse * log2(e); +inf where the row sees no key
  float* delta;     // per tile [rows]: rowsum(dout * out) - dlse
};

struct IsaKernel {
  const char* name;
  // Forward.
  int block_rows;  // most rows in one BlockTask
  size_t (*scratch_floats)(const SoftmaxFwdParams& p);  // per worker, 64-byte aligned
  void (*run_block)(const SoftmaxFwdParams& p, const BlockTask& task, float* scratch);
  // out and lse of the task's rows from the partials of n_splits key ranges, each
  // `stride` floats apart.
  void (*merge_splits)(const SoftmaxFwdParams& p, const BlockTask& task, const float* partials,
                       int64_t stride, int n_splits);
  // Backward: prepare every query tile, then run key blocks (each owns its rows of dk, dv
  // and adds its part of dq / scale into the worker's dq tiles [rows][dp]), then sum the
  // workers' dq tiles into dq.
  int bwd_rows, bwd_keys;
  size_t (*bwd_scratch_floats)(const SoftmaxFwdParams& p, const BwdWorkspace& ws);
  void (*bwd_prepare)(const SoftmaxBwdParams& p, const BwdWorkspace& ws, int64_t b, int64_t h,
                      int64_t qb);
  void (*bwd_key_blocks)(const SoftmaxBwdParams& p, const BwdWorkspace& ws, int64_t b,
                         int64_t kv_head, int64_t kb_begin, int64_t kb_end, float* dq,
                         float* scratch);
  void (*bwd_finish)(const SoftmaxBwdParams& p, const BwdWorkspace& ws, int64_t b, int64_t h,
                     int64_t qb, const float* const* dq_parts, int n_parts);
};

// Each is defined in its own translation unit, compiled for that instruction set.
const IsaKernel& softmax_kernel_base();
#if defined(PYATTN_HAVE_AVX2)
const IsaKernel& softmax_kernel_avx2();
#endif
#if defined(PYATTN_HAVE_AVX512)
const IsaKernel& softmax_kernel_avx512();
#endif

// Kernels this machine can run, best first.
int available_isas(const IsaKernel* out[], int capacity);

// Selects the kernel by name ("" = best available); returns false if unknown here.
bool set_isa(const char* name);
const char* forced_isa();  // "" when the best available one is used
const char* current_isa();

// Runs the whole forward / backward on up to num_threads threads. Tensors are of dtype
// p.dtype (lse, dlse, dbias float32); see params.h.
void softmax_fwd(const SoftmaxFwdParams& p, int num_threads);
void softmax_bwd(const SoftmaxBwdParams& p, int num_threads);

}  // namespace cpu
}  // namespace pyattn
