// CUDA token-by-token causal linear attention for short inputs (<= kRecurrentMaxSeq tokens):
// the decoding step. Memory-bound on the float32 state, which each CTA reads once and
// writes once: one CTA per (batch * query head, 32-column value tile), lane c owns column
// c0 + c and warp w owns state rows f = w + 4 i, so every state row is one coalesced 128-byte
// access and each thread keeps its kBucket / 4 state values in registers across the tokens.

#include "linear_cuda_common.cuh"
#include "linear_cuda_kernels.h"

namespace pyattn {
namespace cuda {
namespace lin {

// For t = 0 .. n-1 (a_t = exp(log_decay_t), qf = f(q) * scale, kf = f(k)):
//   S <- a_t S + kf_t^T v_t,   z <- a_t z + kf_t,
//   out_t = (qf_t S) / (qf_t . z + eps)  (normalize)  or  qf_t S.
// The sums over f are split over the 4 warps: each warp's partial goes to smem, and the
// partials are added after the token loop (the state itself never leaves registers).
template <typename T, int kBucket>
__global__ void __launch_bounds__(kRecBV * kRecWarps)
    recurrent_fwd_kernel(const LinearFwdParams p) {
  constexpr int kRows = kBucket / kRecWarps;  // state rows per thread
  constexpr int kMaxT = kRecurrentMaxSeq;
  __shared__ float qf[kMaxT][kBucket];
  __shared__ float kf[kMaxT][kBucket];
  __shared__ float vs[kMaxT][kRecBV];
  __shared__ float decay[kMaxT];
  __shared__ float part[kRecWarps][kMaxT][kRecBV];
  __shared__ float zpart[kRecWarps][kMaxT];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t bh = blockIdx.x, b = bh / p.heads_q, h = bh % p.heads_q;
  const int64_t kvh = h / (p.heads_q / p.heads_kv);
  const int F = static_cast<int>(p.feat), Dv = static_cast<int>(p.dim_v);
  const int c0 = blockIdx.y * kRecBV, c = c0 + lane;
  const bool col_ok = c < Dv;
  const int n = static_cast<int>(p.seq);

  // Issue the state loads first: they are the traffic that matters.
  float s[kRows];
  const float* s0 = p.state_s != nullptr
                        ? p.state_s + b * p.state_s_stride[0] + h * p.state_s_stride[1] +
                              c * p.state_s_stride[3]
                        : nullptr;
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int f = warp + kRecWarps * i;
    s[i] = (s0 != nullptr && col_ok && f < F) ? s0[f * p.state_s_stride[2]] : 0.0f;
  }
  // z: warp w's lanes own rows f = w + 4 * lane (kBucket / 4 <= 32 rows per warp).
  const int fz = warp + kRecWarps * lane;
  float z = 0.0f;
  if (p.state_z != nullptr && fz < F) {
    z = p.state_z[b * p.state_z_stride[0] + h * p.state_z_stride[1] + fz * p.state_z_stride[2]];
  }

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + kvh * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + kvh * p.v_stride[1];
  for (int i = tid; i < n * kBucket; i += blockDim.x) {
    const int t = i / kBucket, f = i - t * kBucket;
    float xq = 0.0f, xk = 0.0f;
    if (f < F) {
      xq = fmap(to_float(q[t * p.q_stride[2] + f * p.q_stride[3]]), p.feature_map) * p.scale;
      xk = fmap(to_float(k[t * p.k_stride[2] + f * p.k_stride[3]]), p.feature_map);
    }
    qf[t][f] = xq;
    kf[t][f] = xk;
  }
  for (int i = tid; i < n * kRecBV; i += blockDim.x) {
    const int t = i / kRecBV, j = i - t * kRecBV;
    vs[t][j] = c0 + j < Dv ? to_float(v[t * p.v_stride[2] + (c0 + j) * p.v_stride[3]]) : 0.0f;
  }
  for (int t = tid; t < n; t += blockDim.x) {
    decay[t] = p.log_decay != nullptr
                   ? expf(p.log_decay[b * p.decay_stride[0] + h * p.decay_stride[1] +
                                      t * p.decay_stride[2]])
                   : 1.0f;
  }
  __syncthreads();

  for (int t = 0; t < n; ++t) {
    const float a = decay[t], vt = vs[t][lane];
    float o = 0.0f;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int f = warp + kRecWarps * i;
      const float x = fmaf(a, s[i], kf[t][f] * vt);  // rows f >= F stay 0: kf is 0 there
      s[i] = x;
      o = fmaf(qf[t][f], x, o);
    }
    part[warp][t][lane] = o;
    if (p.normalize) {
      const float kz = fz < kBucket ? kf[t][fz] : 0.0f;
      const float qz = fz < kBucket ? qf[t][fz] : 0.0f;
      z = fmaf(a, z, kz);
      const float d = warp_sum(qz * z);
      if (lane == 0) zpart[warp][t] = d;
    }
  }
  if (!p.normalize) {  // z still has to be carried to the final state
    for (int t = 0; t < n; ++t) z = fmaf(decay[t], z, fz < kBucket ? kf[t][fz] : 0.0f);
  }
  __syncthreads();

  if (p.out != nullptr) {
    T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1];
    for (int i = tid; i < n * kRecBV; i += blockDim.x) {
      const int t = i / kRecBV, j = i - t * kRecBV;
      if (c0 + j >= Dv) continue;
      float o = 0.0f, d = 0.0f;
#pragma unroll
      for (int w = 0; w < kRecWarps; ++w) {
        o += part[w][t][j];
        d += zpart[w][t];
      }
      if (p.normalize) o /= d + p.eps;
      out[t * p.out_stride[2] + (c0 + j) * p.out_stride[3]] = from_float<T>(o);
    }
  }
  if (p.final_s != nullptr && col_ok) {
    float* s1 = p.final_s + b * p.final_s_stride[0] + h * p.final_s_stride[1] +
                c * p.final_s_stride[3];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int f = warp + kRecWarps * i;
      if (f < F) s1[f * p.final_s_stride[2]] = s[i];
    }
  }
  if (p.final_z != nullptr && blockIdx.y == 0 && fz < F) {
    p.final_z[b * p.final_z_stride[0] + h * p.final_z_stride[1] + fz * p.final_z_stride[2]] = z;
  }
}

}  // namespace lin

template <typename T, int kBucket>
cudaError_t linear_recurrent_fwd(const LinearFwdParams& p, const LaunchPlan& plan,
                                 cudaStream_t stream) {
  if (plan.grid[0] == 0 || plan.grid[1] == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(plan.grid[0]), static_cast<unsigned>(plan.grid[1]), 1);
  const auto kernel = lin::recurrent_fwd_kernel<T, kBucket>;
  PYATTN_LAUNCH(kernel, grid, kRecBV * kRecWarps, 0, stream)(p);
  return cudaGetLastError();
}

#define PYATTN_LINEAR_REC(T, B) \
  template cudaError_t linear_recurrent_fwd<T, B>(const LinearFwdParams&, const LaunchPlan&, \
                                                  cudaStream_t);
PYATTN_LINEAR_REC(float, 64)
PYATTN_LINEAR_REC(float, 128)
PYATTN_LINEAR_REC(__half, 64)
PYATTN_LINEAR_REC(__half, 128)
PYATTN_LINEAR_REC(__nv_bfloat16, 64)
PYATTN_LINEAR_REC(__nv_bfloat16, 128)
#undef PYATTN_LINEAR_REC

}  // namespace cuda
}  // namespace pyattn
