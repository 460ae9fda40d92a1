// Launch plan of the scalar CUDA softmax forward (attention_cuda_simt.cu). Plain C++.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common/cuda_plan.h"
#include "params.h"

namespace pyattn {
namespace cuda {

constexpr int kSimtWarps = 4;
constexpr int kSimtRowsPerWarp = 4;
constexpr int kSimtRows = kSimtWarps * kSimtRowsPerWarp;  // queries per CTA
constexpr int kSimtKeys = 32;                             // keys per tile, one per lane

// K tile padded by one column (lane j reads row j: stride D + 1 avoids bank conflicts), V tile,
// pre-scaled Q rows, unnormalised output rows, and each warp's probabilities of the tile.
inline int64_t simt_smem_bytes(int64_t head_dim, int64_t head_dim_v) {
  return static_cast<int64_t>(sizeof(float)) *
         (kSimtKeys * (head_dim + 1) + kSimtKeys * head_dim_v + kSimtRows * head_dim +
          kSimtRows * head_dim_v + kSimtWarps * kSimtKeys);
}

inline LaunchPlan plan_softmax_fwd_simt(const SoftmaxFwdParams& p, DType dtype, const DeviceInfo& dev) {
  LaunchPlan plan;
  plan.kernel = "softmax_fwd_simt";
  plan.block = kSimtWarps * 32;
  plan.smem_bytes = simt_smem_bytes(p.head_dim, p.head_dim_v);
  const int64_t q_blocks = (p.seq_q + kSimtRows - 1) / kSimtRows;
  plan.grid[0] = std::min<int64_t>(p.batch * p.heads_q * q_blocks, kMaxGridX);
  (void)dtype;
  if (p.bias != nullptr || p.dropout_p > 0.0f || p.cu_seqlens_q != nullptr) {
    plan.error = "the CUDA kernels take no attn_bias, dropout or packed (varlen) batch";
  } else if (dev.sm_major < 7) {
    plan.error = "the CUDA kernels need compute capability 7.0 or newer";
  } else if (plan.smem_bytes > dev.max_smem_optin) {
    plan.error = "head_dim + head_dim_v too large for the scalar CUDA kernel's shared memory";
  }
  return plan;
}

}  // namespace cuda
}  // namespace pyattn
