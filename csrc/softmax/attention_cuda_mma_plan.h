// Launch plans of the tensor-core (mma.sync) softmax attention kernels
// (attention_cuda_fwd.cu, attention_cuda_bwd.cu): tile sizes per head-dim bucket, shared
// memory, grid and the backward's float32 workspace. Plain C++ (no CUDA headers).
//
// Forward: a CTA of 4 warps owns kFwdBlockM = 64 query rows (16 per warp) of one
// (batch, head) and sweeps the key blocks those rows can see, kFwdBlockN keys at a time.
// Shared memory holds the Q tile and one K and one V tile, each row padded by 8 elements.
//
// Backward: a CTA of 4 warps owns kBwdBlockN = 64 keys (16 per warp) of one
// (batch, kv head) and sweeps the query blocks (kBwdBlockM rows) of every query head of the
// group that see them, keeping dK, dV of its keys in registers and adding dQ into a float32
// accumulator with atomics. At head dim 256 dK and dV do not fit in registers together, so
// the main kernel runs twice: once for dV, once for dK and dQ.
//
// When the (batch, kv head, key block) CTAs alone would not fill the GPU (GQA / MQA with few
// kv heads), the query heads of each group are split over plan.num_splits CTAs per key block
// (bwd_group_splits); their dK, dV partial sums then meet in float32 accumulators.
//
// Backward workspace (float32), with R = batch * heads_q * seq_q rows in (b, h, i) order and
// Rk = batch * heads_kv * seq_k rows in (b, kv head, j) order:
//   [0, R * D)          dq accumulator, row-major (R, D), D = head_dim
//   [R * D, R * D + R)  delta_i = rowsum(dO * O)_i - dlse_i
//   [R * D + R, .. + R) lse_i * log2(e), +inf for rows that see no key (so P = 0 there)
//   only when num_splits > 1, then: dk accumulator (Rk, D), dv accumulator (Rk, Dv)
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common/cuda_plan.h"
#include "params.h"

namespace pyattn {
namespace cuda {

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = kMmaWarps * 32;

// ---- forward tiles
constexpr int kFwdBlockM = 16 * kMmaWarps;  // query rows per CTA
constexpr int fwd_block_n(int bucket) { return bucket == 256 ? 32 : 64; }  // keys per tile
constexpr int mma_pitch(int cols) { return cols + 8; }  // padded shared row, elements

// Q tile + K tile + V tile, 16-bit elements.
constexpr int64_t fwd_mma_smem_bytes(int bucket) {
  return 2 * static_cast<int64_t>(kFwdBlockM + 2 * fwd_block_n(bucket)) * mma_pitch(bucket);
}

// ---- backward tiles
constexpr int kBwdBlockN = 16 * kMmaWarps;  // keys per CTA
constexpr int bwd_block_m(int bucket) { return bucket == 256 ? 32 : 64; }  // query rows per step
constexpr bool bwd_two_pass(int bucket) { return bucket == 256; }

// K, V tiles (kBwdBlockN rows), Q, dO tiles (block_m rows), dS^T tile (kBwdBlockN x block_m)
// in 16-bit elements, then block_m lse and delta floats.
constexpr int64_t bwd_mma_smem_bytes(int bucket) {
  return 2 * (static_cast<int64_t>(2 * kBwdBlockN + 2 * bwd_block_m(bucket)) * mma_pitch(bucket) +
              static_cast<int64_t>(kBwdBlockN) * mma_pitch(bwd_block_m(bucket))) +
         4 * 2 * static_cast<int64_t>(bwd_block_m(bucket));
}

// The same constants as template members, for device code (which cannot call the host
// constexpr functions above without --expt-relaxed-constexpr).
template <int kBucket>
struct MmaTiles {
  static constexpr int kPitch = mma_pitch(kBucket);
  static constexpr int kFwdBlockN = fwd_block_n(kBucket);
  static constexpr int kBwdBlockM = bwd_block_m(kBucket);
  static constexpr int kBwdPitchS = mma_pitch(bwd_block_m(kBucket));
  static constexpr bool kBwdTwoPass = bwd_two_pass(kBucket);
};

// Warps of 8 rows each in the backward's row-wise helper kernels (delta, dq conversion).
constexpr int kBwdRowWarps = 8;

// Query-head splits of the backward: enough CTAs for two per SM, at most one split per query
// head of a group, no empty split.
inline int64_t bwd_group_splits(const SoftmaxFwdParams& p, const DeviceInfo& dev) {
  const int64_t group = p.heads_kv > 0 ? p.heads_q / p.heads_kv : 1;
  const int64_t base = p.batch * p.heads_kv * ((p.seq_k + kBwdBlockN - 1) / kBwdBlockN);
  const int64_t target = 2 * static_cast<int64_t>(dev.num_sms);
  if (group <= 1 || base <= 0 || base >= target) return 1;
  const int64_t splits = std::min<int64_t>(group, (target + base - 1) / base);
  const int64_t per_split = (group + splits - 1) / splits;
  return (group + per_split - 1) / per_split;
}

inline int64_t bwd_mma_workspace_floats(const SoftmaxFwdParams& p, int64_t splits) {
  const int64_t rows = p.batch * p.heads_q * p.seq_q;
  const int64_t kv_rows = p.batch * p.heads_kv * p.seq_k;
  return rows * p.head_dim + 2 * rows + (splits > 1 ? kv_rows * (p.head_dim + p.head_dim_v) : 0);
}

namespace detail {

inline std::string mma_common_error(const SoftmaxFwdParams& p, DType dtype, const DeviceInfo& dev,
                                    int bucket, int64_t smem) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) {
    return "the tensor-core kernels take float16 or bfloat16 only";
  }
  if (p.bias != nullptr || p.dropout_p > 0.0f || p.cu_seqlens_q != nullptr || p.cu_seqlens_k != nullptr) {
    return "the tensor-core kernels take no attn_bias, dropout or packed (varlen) batch";
  }
  if (bucket == 0) return "the tensor-core kernels need head dims of 1 to 256";
  if (dev.sm_major < 8) return "the tensor-core kernels need compute capability 8.0 or newer";
  if (smem > dev.max_smem_optin) return "the tensor-core kernel's tiles exceed the device's shared memory";
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return "heads_q must be a multiple of heads_kv";
  return std::string();
}

}  // namespace detail

// grid[0] = batch * heads_q * ceil(seq_q / 64) CTAs, each (b, h, query block); capped at
// kMaxGridX (the kernel loops over the rest) and at least 1 (with nothing to do the launch
// function returns before launching).
inline LaunchPlan plan_softmax_fwd_mma(const SoftmaxFwdParams& p, DType dtype, const DeviceInfo& dev) {
  LaunchPlan plan;
  plan.kernel = "softmax_fwd_mma";
  plan.head_dim_bucket = head_dim_bucket(std::max(p.head_dim, p.head_dim_v));
  plan.block = kMmaThreads;
  plan.smem_bytes = plan.head_dim_bucket ? fwd_mma_smem_bytes(plan.head_dim_bucket) : 0;
  const int64_t q_blocks = (p.seq_q + kFwdBlockM - 1) / kFwdBlockM;
  plan.grid[0] = std::max<int64_t>(1, std::min<int64_t>(p.batch * p.heads_q * q_blocks, kMaxGridX));
  plan.error = detail::mma_common_error(p, dtype, dev, plan.head_dim_bucket, plan.smem_bytes);
  return plan;
}

// grid[0] = batch * heads_kv * ceil(seq_k / 64) * num_splits CTAs of the main kernel, each
// (b, kv head, key block, query-head split); capped at kMaxGridX, at least 1. The helper
// kernels (delta, conversions) size their own grids from the shapes.
inline LaunchPlan plan_softmax_bwd_mma(const SoftmaxBwdParams& p, DType dtype, const DeviceInfo& dev) {
  const SoftmaxFwdParams& f = p.fwd;
  LaunchPlan plan;
  plan.kernel = "softmax_bwd_mma";
  plan.head_dim_bucket = head_dim_bucket(std::max(f.head_dim, f.head_dim_v));
  plan.block = kMmaThreads;
  plan.smem_bytes = plan.head_dim_bucket ? bwd_mma_smem_bytes(plan.head_dim_bucket) : 0;
  const int64_t splits = bwd_group_splits(f, dev);
  plan.num_splits = static_cast<int>(splits);
  const int64_t k_blocks = (f.seq_k + kBwdBlockN - 1) / kBwdBlockN;
  plan.grid[0] = std::max<int64_t>(1, std::min<int64_t>(f.batch * f.heads_kv * k_blocks * splits, kMaxGridX));
  plan.workspace_floats = bwd_mma_workspace_floats(f, splits);
  plan.error = detail::mma_common_error(f, dtype, dev, plan.head_dim_bucket, plan.smem_bytes);
  if (plan.ok() && p.dbias != nullptr) plan.error = "the tensor-core backward computes no dbias";
  return plan;
}

}  // namespace cuda
}  // namespace pyattn
