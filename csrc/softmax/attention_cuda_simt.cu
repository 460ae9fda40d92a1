// Scalar CUDA kernel of the fused softmax attention forward (float32, float16, bfloat16
// inputs, float32 accumulation), with the semantics of the CPU kernel: arbitrary strides, GQA,
// bottom-right causal mask, sliding window, softcap, lse. It runs float32 and head dims the
// tensor-core kernel has no bucket for; its plan is attention_cuda_simt_plan.h.
//
// A straightforward tiled online softmax without tensor cores: a CTA of kWarps warps
// owns kRows consecutive queries of one (batch, head); each key tile of 32 keys (and its
// values) is staged in shared memory once for all of them. Within a warp, lane j scores
// key j0 + j, the warp reduces max and sum with shuffles, and lanes then split the value
// dimension to update the output rows kept in shared memory.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../common/cuda_elementwise.cuh"
#include "../common/cuda_launch_macro.h"
#include "attention_cuda_kernels.h"
#include "attention_cuda_simt_plan.h"

namespace pyattn {
namespace cuda {
namespace {

constexpr int kWarps = kSimtWarps;
constexpr int kRowsPerWarp = kSimtRowsPerWarp;
constexpr int kRows = kSimtRows;  // queries per CTA
constexpr int kKeys = kSimtKeys;  // keys per tile, one per lane
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    softmax_fwd_kernel(const SoftmaxFwdParams p, int64_t q_blocks, int64_t n_ctas) {
  PYATTN_DYNAMIC_SMEM(float, smem);
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  float* k_s = smem;                  // [kKeys][D + 1]
  float* v_s = k_s + kKeys * (D + 1);  // [kKeys][Dv]
  float* q_s = v_s + kKeys * Dv;       // [kRows][D], pre-scaled
  float* o_s = q_s + kRows * D;        // [kRows][Dv], unnormalised output
  float* p_s = o_s + kRows * Dv;       // [kWarps][kKeys], probabilities of the tile

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  const int64_t group = p.heads_q / p.heads_kv;
  const bool softcap = p.softcap > 0.0f;
  const float q_mul = softcap ? p.scale / p.softcap : p.scale * kLog2e;
  const float cap_mul = p.softcap * kLog2e;

  for (int64_t cta = blockIdx.x; cta < n_ctas; cta += gridDim.x) {
    const int64_t qb = cta % q_blocks, bh = cta / q_blocks;
    const int64_t b = bh / p.heads_q, h = bh % p.heads_q, kvh = h / group;
    const int64_t i0 = qb * kRows;
    const T* q_bh = q + b * p.q_stride[0] + h * p.q_stride[1];
    const T* k_bh = k + b * p.k_stride[0] + kvh * p.k_stride[1];
    const T* v_bh = v + b * p.v_stride[0] + kvh * p.v_stride[1];

    // Keys any query of the CTA can see; the rest are never loaded.
    int64_t kmin = INT64_MAX, kmax = -1;
    for (int r = 0; r < kRows && i0 + r < p.seq_q; ++r) {
      const int64_t lo = p.key_lo(i0 + r), hi = p.key_hi(i0 + r);
      if (lo > hi) continue;
      kmin = lo < kmin ? lo : kmin;
      kmax = hi > kmax ? hi : kmax;
    }

    for (int x = threadIdx.x; x < kRows * D; x += blockDim.x) {
      const int r = x / D, d = x % D;
      q_s[x] = i0 + r < p.seq_q ? to_float(q_bh[(i0 + r) * p.q_stride[2] + d * p.q_stride[3]]) * q_mul
                                : 0.0f;
    }
    for (int x = threadIdx.x; x < kRows * Dv; x += blockDim.x) o_s[x] = 0.0f;

    float m[kRowsPerWarp], l[kRowsPerWarp];
    int64_t lo[kRowsPerWarp], hi[kRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t i = i0 + warp * kRowsPerWarp + rr;
      m[rr] = -INFINITY;
      l[rr] = 0.0f;
      lo[rr] = i < p.seq_q ? p.key_lo(i) : 1;
      hi[rr] = i < p.seq_q ? p.key_hi(i) : 0;  // rows past seq_q see nothing
    }
    __syncthreads();

    for (int64_t j0 = kmin; j0 <= kmax; j0 += kKeys) {
      const int bn = static_cast<int>(kmax + 1 - j0 < kKeys ? kmax + 1 - j0 : kKeys);
      for (int x = threadIdx.x; x < kKeys * D; x += blockDim.x) {
        const int jj = x / D, d = x % D;
        k_s[jj * (D + 1) + d] =
            jj < bn ? to_float(k_bh[(j0 + jj) * p.k_stride[2] + d * p.k_stride[3]]) : 0.0f;
      }
      for (int x = threadIdx.x; x < kKeys * Dv; x += blockDim.x) {
        const int jj = x / Dv, d = x % Dv;
        v_s[x] = jj < bn ? to_float(v_bh[(j0 + jj) * p.v_stride[2] + d * p.v_stride[3]]) : 0.0f;
      }
      __syncthreads();

#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        // Warp-uniform: skip rows that see no key of this tile.
        if (lo[rr] > hi[rr] || hi[rr] < j0 || lo[rr] > j0 + bn - 1) continue;
        const int r = warp * kRowsPerWarp + rr;
        const int64_t j = j0 + lane;
        float s = -INFINITY;
        if (lane < bn && j >= lo[rr] && j <= hi[rr]) {
          float dot = 0.0f;
          for (int d = 0; d < D; ++d) dot = fmaf(q_s[r * D + d], k_s[lane * (D + 1) + d], dot);
          s = softcap ? tanhf(dot) * cap_mul : dot;  // log2 units
        }
        const float m_new = fmaxf(m[rr], warp_max(s));
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = exp2f(m[rr] - m_use);
        const float prob = exp2f(s - m_use);
        l[rr] = l[rr] * alpha + warp_sum(prob);
        m[rr] = m_new;
        p_s[warp * kKeys + lane] = prob;
        __syncwarp();
        for (int d = lane; d < Dv; d += 32) {
          float acc = o_s[r * Dv + d] * alpha;
          for (int jj = 0; jj < bn; ++jj) acc = fmaf(p_s[warp * kKeys + jj], v_s[jj * Dv + d], acc);
          o_s[r * Dv + d] = acc;
        }
        __syncwarp();
      }
      __syncthreads();  // the next tile overwrites k_s / v_s
    }

#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t i = i0 + r;
      if (i >= p.seq_q) continue;
      const bool visible = l[rr] > 0.0f;
      const float inv_l = visible ? 1.0f / l[rr] : 0.0f;
      T* o = out + b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
      for (int d = lane; d < Dv; d += 32) o[d * p.out_stride[3]] = from_float<T>(o_s[r * Dv + d] * inv_l);
      if (lane == 0 && p.lse != nullptr) {
        p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + i * p.lse_stride[2]] =
            visible ? (m[rr] + log2f(l[rr])) * kLn2 : -INFINITY;
      }
    }
    __syncthreads();  // the next CTA iteration overwrites q_s / o_s
  }
}

}  // namespace

template <typename T>
cudaError_t softmax_fwd_simt(const SoftmaxFwdParams& p, const LaunchPlan& plan, cudaStream_t stream) {
  if (plan.smem_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        softmax_fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem_bytes));
    if (err != cudaSuccess) return err;
  }
  const int64_t q_blocks = (p.seq_q + kRows - 1) / kRows;
  const int64_t n_ctas = p.batch * p.heads_q * q_blocks;
  // A grid-stride loop over CTAs: the plan caps gridDim.x at 2^31 - 1.
  PYATTN_LAUNCH(softmax_fwd_kernel<T>, static_cast<unsigned>(plan.grid[0]), plan.block, plan.smem_bytes, stream)(
      p, q_blocks, n_ctas);
  return cudaGetLastError();
}

template cudaError_t softmax_fwd_simt<float>(const SoftmaxFwdParams&, const LaunchPlan&, cudaStream_t);
template cudaError_t softmax_fwd_simt<__half>(const SoftmaxFwdParams&, const LaunchPlan&, cudaStream_t);
template cudaError_t softmax_fwd_simt<__nv_bfloat16>(const SoftmaxFwdParams&, const LaunchPlan&, cudaStream_t);

}  // namespace cuda
}  // namespace pyattn
