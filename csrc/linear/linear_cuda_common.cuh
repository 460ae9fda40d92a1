// Device helpers shared by the CUDA linear-attention kernels: dtype conversion, feature maps
// and their derivatives, strided tile loads into float32 shared memory, the in-chunk decay
// prefix sums, and a register-tiled SIMT product over a 16 x 16 thread grid.
//
// Numerics follow the CPU kernels (linear_cpu_tiles.h): float32 states and products, the
// in-chunk cumulative log decay L kept as a float pair (hi, lo) from a double prefix sum so
// that L_t - L_s is accurate whatever |L|, every decay weight exp(x) with x <= 0.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_elementwise.cuh"
#include "../common/cuda_launch_macro.h"
#include "linear_cuda_plan.h"
#include "linear_params.h"

namespace pyattn {
namespace cuda {
namespace lin {

// f(x): identity, elu(x) + 1, relu (LinearFwdParams::FeatureMap).
__host__ __device__ __forceinline__ float fmap(float x, int map) {
  if (map == LinearFwdParams::kElu) return x > 0.0f ? x + 1.0f : expf(x);
  if (map == LinearFwdParams::kRelu) return x > 0.0f ? x : 0.0f;
  return x;
}

// f'(x), with relu'(0) = 0 and elu'(0) = e^0 = 1 as on the CPU.
__host__ __device__ __forceinline__ float fmap_grad(float x, int map) {
  if (map == LinearFwdParams::kElu) return x > 0.0f ? 1.0f : expf(x);
  if (map == LinearFwdParams::kRelu) return x > 0.0f ? 1.0f : 0.0f;
  return 1.0f;
}

// A -inf log decay (a state reset) must not meet another -inf in L_t - L_s: clamp, as the CPU.
__host__ __device__ __forceinline__ float clamp_log_decay(float x) { return x > -1e4f ? x : -1e4f; }

// Intra-chunk weight exp(L_t - L_s) from the hi / lo pairs (s <= t, so the difference is <= 0
// up to rounding, clamped).
__host__ __device__ __forceinline__ float pair_weight(float ht, float lt, float hs, float ls) {
  const float d = (ht - hs) + (lt - ls);
  return expf(d < 0.0f ? d : 0.0f);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Sum over the 16 lanes of a half warp (the tx threads of one ty row).
__device__ __forceinline__ float half_warp_sum(float x) {
#pragma unroll
  for (int o = 8; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// dst[t][c] (ld) = map(src[t * ts + c * cs]) * mul for t < n, c < cols; 0 elsewhere in
// [0, rows) x [0, width). All threads of the CTA take part.
template <typename T>
__device__ __forceinline__ void load_tile(float* dst, int ld, int rows, int width, const T* src,
                                          int64_t ts, int64_t cs, int n, int cols, int map,
                                          float mul) {
  for (int i = threadIdx.x; i < rows * width; i += blockDim.x) {
    const int t = i / width, c = i - t * width;
    float x = 0.0f;
    if (t < n && c < cols && src != nullptr) x = fmap(to_float(src[t * ts + c * cs]), map) * mul;
    dst[t * ld + c] = x;
  }
}

// Inclusive double prefix sums of the chunk's clamped log decays (tokens past n add 0), by
// one warp, C / 32 consecutive tokens per lane. Writes L as (hi, lo), g_t = exp(L_t),
// w_t = exp(L_last - L_t) and *G = exp(L_last). No decay: L = 0, g = w = G = 1.
template <int C>
__device__ __forceinline__ void chunk_decay_warp(const float* ld, int64_t stride, int n, float* lhi,
                                                 float* llo, float* g, float* w, float* G) {
  static_assert(C % 32 == 0, "chunk must be whole warps");
  constexpr int kPer = C / 32;
  const int lane = threadIdx.x & 31;
  double loc[kPer];
  double run = 0.0;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int t = lane * kPer + i;
    if (ld != nullptr && t < n) run += static_cast<double>(clamp_log_decay(ld[t * stride]));
    loc[i] = run;
  }
  double incl = run;  // inclusive scan of the lane totals
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const double y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  const double before = incl - run;
  const double last = __shfl_sync(0xffffffffu, incl, 31);
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int t = lane * kPer + i;
    const double L = before + loc[i];
    const float hi = static_cast<float>(L);
    lhi[t] = hi;
    llo[t] = static_cast<float>(L - static_cast<double>(hi));
    g[t] = expf(static_cast<float>(L));
    w[t] = expf(static_cast<float>(last - L));
  }
  if (lane == 0) *G = expf(static_cast<float>(last));
}

// Register-tiled product over the 16 x 16 thread grid (ty = tid / 16, tx = tid % 16):
// acc[i][j] += sum_{k < K} a(ty + 16 i, k) * b(k, tx + 16 j). Strided ownership keeps a
// warp's reads of b on consecutive columns and of a on two rows (a broadcast).
template <int MI, int NJ, typename FA, typename FB>
__device__ __forceinline__ void tile_product(float (&acc)[MI][NJ], int k0, int k1, FA a, FB b) {
  const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll 2
  for (int k = k0; k < k1; ++k) {
    float av[MI], bv[NJ];
#pragma unroll
    for (int i = 0; i < MI; ++i) av[i] = a(ty + 16 * i, k);
#pragma unroll
    for (int j = 0; j < NJ; ++j) bv[j] = b(k, tx + 16 * j);
#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
      for (int j = 0; j < NJ; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
}

template <int MI, int NJ>
__device__ __forceinline__ void zero_acc(float (&acc)[MI][NJ]) {
#pragma unroll
  for (int i = 0; i < MI; ++i) {
#pragma unroll
    for (int j = 0; j < NJ; ++j) acc[i][j] = 0.0f;
  }
}

// Head (b, h)'s state slice into shared memory: S[f][c0 + c] (c < ncols) as [kBucket][BV] and
// z[f] as [kBucket], from float32 tensors of strides (B, H, F, Dv) and (B, H, F); zeros where a
// tensor is absent (null) or past F / ncols. Reads the initial state, or the final state's gradient.
template <int kBucket, int BV>
__device__ __forceinline__ void load_state_slice(float* s_dst, float* z_dst, const float* s,
                                                 const int64_t (&s_stride)[4], const float* z,
                                                 const int64_t (&z_stride)[3], int64_t b, int64_t h,
                                                 int F, int c0, int ncols, int tid) {
  for (int i = tid; i < kBucket * BV; i += blockDim.x) {
    const int f = i / BV, c = i - f * BV;
    s_dst[i] = (s != nullptr && f < F && c < ncols)
                   ? s[b * s_stride[0] + h * s_stride[1] + f * s_stride[2] + (c0 + c) * s_stride[3]]
                   : 0.0f;
  }
  for (int f = tid; f < kBucket; f += blockDim.x) {
    z_dst[f] = (z != nullptr && f < F) ? z[b * z_stride[0] + h * z_stride[1] + f * z_stride[2]] : 0.0f;
  }
}

// The smem layouts of linear_cuda_plan.h as constexpr scalars (device code may read
// constexpr scalars but not call the host constexpr functions).
template <int kBucket, int C>
struct FwdLayout {
  static constexpr int64_t q = fwd_smem(kBucket, C).q, k = fwd_smem(kBucket, C).k,
                           v = fwd_smem(kBucket, C).v, s = fwd_smem(kBucket, C).s,
                           a = fwd_smem(kBucket, C).a, lhi = fwd_smem(kBucket, C).lhi,
                           llo = fwd_smem(kBucket, C).llo, g = fwd_smem(kBucket, C).g,
                           w = fwd_smem(kBucket, C).w, den = fwd_smem(kBucket, C).den,
                           z = fwd_smem(kBucket, C).z, scal = fwd_smem(kBucket, C).scal,
                           states_only = fwd_smem(kBucket, C).states_only,
                           total = fwd_smem(kBucket, C).total;
};

// ------------------------------------------------------------------ chunked forward

// What the backward's run of the forward sweep saves (all null in the forward).
struct SweepArgs {
  float* states = nullptr;   // [bh][nc][F][Dv]: the state entering each chunk
  float* zstates = nullptr;  // [bh][nc][F]
  float* r = nullptr;        // [bh][S]: 1 / (den + eps), 1 without normalize (value tile 0)
  float* dn = nullptr;       // [bh][nvt][S]: dout_t . o_t over this CTA's value columns
  const void* dout = nullptr;  // null: zero
  int64_t dout_stride[4] = {0, 0, 0, 0};
  // Chunk-parallel output (the forward's second pass): one CTA per (b * Hq + h, chunk c) of a
  // (B*Hq*nc, value tiles) grid starts from in_states[bh][c] (the state entering the chunk,
  // saved by a states-only first pass) and computes that chunk's output only.
  const float* in_states = nullptr;
  const float* in_zstates = nullptr;
};

// The backward sweep's per-token terms of one chunk: r_t (value tile 0) and this tile's part
// of dout_t . o_t (o unnormalized, in the registers of the 16 x 16 thread grid).
template <typename T, int MC, int NV>
__device__ __forceinline__ void save_norm_terms(const LinearFwdParams& p, const SweepArgs& sw,
                                                const float (&o)[MC][NV], const float* den,
                                                int64_t bh, int64_t b, int64_t h, int c0,
                                                int ncols, int64_t t0, int n) {
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const T* dout = sw.dout != nullptr ? static_cast<const T*>(sw.dout) + b * sw.dout_stride[0] +
                                           h * sw.dout_stride[1] + c0 * sw.dout_stride[3]
                                     : nullptr;
#pragma unroll
  for (int i = 0; i < MC; ++i) {
    const int t = ty + 16 * i;
    float x = 0.0f;
    if (dout != nullptr && t < n) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int c = tx + 16 * j;
        if (c < ncols) {
          x += to_float(dout[(t0 + t) * sw.dout_stride[2] + c * sw.dout_stride[3]]) * o[i][j];
        }
      }
    }
    x = half_warp_sum(x);
    if (tx == 0 && t < n) sw.dn[(bh * gridDim.y + blockIdx.y) * p.seq + t0 + t] = x;
  }
  if (blockIdx.y == 0 && tid < n) {
    sw.r[bh * p.seq + t0 + tid] = p.normalize ? 1.0f / (den[tid] + p.eps) : 1.0f;
  }
}

// One CTA per (b * Hq + h, value tile of kFwdBV columns [c0, c0 + BV)), sequential over
// chunks of C tokens with the F x BV float32 state S and the F normalizer z in smem.
// Per chunk (L the in-chunk cumulative log decay, g_t = exp(L_t), w_s = exp(L_last - L_s),
// G = exp(L_last)):
//   A    = (qf kf^T) * exp(L_t - L_s) [s <= t]               C x C
//   o    = g * (qf S) + A V,   den = g * (qf . z) + rowsum(A)
//   out  = o / (den + eps)  (normalize)  or  o
//   S   <- G S + kf^T (w * V),   z <- G z + kf^T w
// Every exponent is a difference of in-chunk sums, <= 0: nothing overflows.
// `sw` empty: the one-pass forward. sw.states: also save the state entering each chunk (the
// backward's sweep, or the first pass of the two-pass forward), and with sw.dn the terms r_t
// and dout_t . o_t the normalizer's gradient needs; p.out null and no sw.dn: only states.
// sw.in_states: the two-pass forward's second pass, every chunk in parallel from its saved
// entering state (no state update, no final state).
template <typename T, int kBucket, int C>
__global__ void __launch_bounds__(kLinThreads, 1)
    chunk_fwd_kernel(const LinearFwdParams p, const SweepArgs sw) {
  using kL = FwdLayout<kBucket, C>;
  constexpr int LD = kBucket + 1, CL = C + 1, BV = kFwdBV;
  constexpr int MC = C / 16, NV = BV / 16, MF = kBucket / 16;
  PYATTN_DYNAMIC_SMEM(float, sm);
  float* qs = sm + kL::q;
  float* ks = sm + kL::k;
  float* vs = sm + kL::v;
  float* Ss = sm + kL::s;
  float* As = sm + kL::a;
  float* lhi = sm + kL::lhi;
  float* llo = sm + kL::llo;
  float* gs = sm + kL::g;
  float* ws = sm + kL::w;
  float* den = sm + kL::den;
  float* zs = sm + kL::z;
  float* scal = sm + kL::scal;

  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15, warp = tid >> 5, lane = tid & 31;
  const int64_t nc = (p.seq + C - 1) / C;
  const bool parallel = sw.in_states != nullptr;
  const int64_t bh = parallel ? blockIdx.x / nc : blockIdx.x;
  const int64_t c_begin = parallel ? blockIdx.x % nc : 0, c_end = parallel ? c_begin + 1 : nc;
  const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
  const int64_t kvh = h / (p.heads_q / p.heads_kv);
  const int F = static_cast<int>(p.feat), Dv = static_cast<int>(p.dim_v);
  const int c0 = blockIdx.y * BV;
  const int ncols = Dv - c0 < BV ? Dv - c0 : BV;
  const bool want_out = p.out != nullptr || sw.dn != nullptr;
  float* states = sw.states;
  float* zstates = sw.zstates;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + kvh * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + kvh * p.v_stride[1] +
               c0 * p.v_stride[3];
  const float* ld = p.log_decay != nullptr
                        ? p.log_decay + b * p.decay_stride[0] + h * p.decay_stride[1]
                        : nullptr;

  if (parallel) {
    const float* src = sw.in_states + (bh * nc + c_begin) * F * Dv + c0;
    for (int i = tid; i < kBucket * BV; i += blockDim.x) {
      const int f = i / BV, c = i - f * BV;
      Ss[i] = (f < F && c < ncols) ? src[static_cast<int64_t>(f) * Dv + c] : 0.0f;
    }
    for (int f = tid; f < kBucket; f += blockDim.x) {
      zs[f] = f < F ? sw.in_zstates[(bh * nc + c_begin) * F + f] : 0.0f;
    }
  } else {
    load_state_slice<kBucket, BV>(Ss, zs, p.state_s, p.state_s_stride, p.state_z, p.state_z_stride, b, h, F,
                                  c0, ncols, tid);
  }
  __syncthreads();

  for (int64_t ci = c_begin; ci < c_end; ++ci) {
    const int64_t t0 = ci * C;
    const int n = p.seq - t0 < C ? static_cast<int>(p.seq - t0) : C;

    // The state entering this chunk, for the backward (written before this chunk updates it).
    if (states != nullptr) {
      float* dst = states + (bh * nc + ci) * F * Dv + c0;
      for (int i = tid; i < F * BV; i += blockDim.x) {
        const int f = i / BV, c = i - f * BV;
        if (c < ncols) dst[static_cast<int64_t>(f) * Dv + c] = Ss[f * BV + c];
      }
      if (blockIdx.y == 0) {
        for (int f = tid; f < F; f += blockDim.x) zstates[(bh * nc + ci) * F + f] = zs[f];
      }
    }
    if (want_out) {
      load_tile(qs, LD, C, kBucket, q + t0 * p.q_stride[2], p.q_stride[2], p.q_stride[3], n, F,
                p.feature_map, p.scale);
    }
    load_tile(ks, LD, C, kBucket, k + t0 * p.k_stride[2], p.k_stride[2], p.k_stride[3], n, F,
              p.feature_map, 1.0f);
    load_tile(vs, BV, C, BV, v + t0 * p.v_stride[2], p.v_stride[2], p.v_stride[3], n, ncols,
              LinearFwdParams::kIdentity, 1.0f);
    if (warp == 0) {
      chunk_decay_warp<C>(ld != nullptr ? ld + t0 * p.decay_stride[2] : nullptr,
                          p.decay_stride[2], n, lhi, llo, gs, ws, scal);
    }
    __syncthreads();

    if (want_out) {
      {  // A = (qf kf^T) * exp(L_t - L_s), lower triangle
        float acc[MC][MC];
        zero_acc(acc);
        tile_product(acc, 0, F, [&](int r, int kk) { return qs[r * LD + kk]; },
                     [&](int kk, int c) { return ks[c * LD + kk]; });
#pragma unroll
        for (int i = 0; i < MC; ++i) {
#pragma unroll
          for (int j = 0; j < MC; ++j) {
            const int t = ty + 16 * i, s = tx + 16 * j;
            As[t * CL + s] =
                s <= t ? acc[i][j] * pair_weight(lhi[t], llo[t], lhi[s], llo[s]) : 0.0f;
          }
        }
      }
      __syncthreads();

      if (p.normalize) {  // den_t, one warp per row
        for (int t = warp; t < C; t += kLinThreads / 32) {
          float x = 0.0f, y = 0.0f;
          for (int s = lane; s < C; s += 32) x += As[t * CL + s];
          for (int f = lane; f < F; f += 32) y += qs[t * LD + f] * zs[f];
          x = warp_sum(x);
          y = warp_sum(y);
          if (lane == 0) den[t] = x + gs[t] * y;
        }
      }
      float o[MC][NV];
      zero_acc(o);
      tile_product(o, 0, F, [&](int r, int kk) { return qs[r * LD + kk]; },
                   [&](int kk, int c) { return Ss[kk * BV + c]; });
#pragma unroll
      for (int i = 0; i < MC; ++i) {
        const float gt = gs[ty + 16 * i];
#pragma unroll
        for (int j = 0; j < NV; ++j) o[i][j] *= gt;
      }
      tile_product(o, 0, n, [&](int r, int kk) { return As[r * CL + kk]; },
                   [&](int kk, int c) { return vs[kk * BV + c]; });
      __syncthreads();  // den complete; S, z no longer read

      if (p.out != nullptr) {
        T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] +
                 c0 * p.out_stride[3];
#pragma unroll
        for (int i = 0; i < MC; ++i) {
          const int t = ty + 16 * i;
          if (t >= n) continue;
          const float mul = p.normalize ? 1.0f / (den[t] + p.eps) : 1.0f;
#pragma unroll
          for (int j = 0; j < NV; ++j) {
            const int c = tx + 16 * j;
            if (c < ncols) {
              out[(t0 + t) * p.out_stride[2] + c * p.out_stride[3]] = from_float<T>(o[i][j] * mul);
            }
          }
        }
      }
      if (sw.dn != nullptr) save_norm_terms<T, MC, NV>(p, sw, o, den, bh, b, h, c0, ncols, t0, n);
    }

    if (!parallel) {  // S <- G S + kf^T (w * V), z <- G z + kf^T w
      const float G = scal[0];
      float acc[MF][NV];
#pragma unroll
      for (int i = 0; i < MF; ++i) {
#pragma unroll
        for (int j = 0; j < NV; ++j) acc[i][j] = G * Ss[(ty + 16 * i) * BV + tx + 16 * j];
      }
      tile_product(acc, 0, n, [&](int f, int s) { return ks[s * LD + f] * ws[s]; },
                   [&](int s, int c) { return vs[s * BV + c]; });
#pragma unroll
      for (int i = 0; i < MF; ++i) {
#pragma unroll
        for (int j = 0; j < NV; ++j) Ss[(ty + 16 * i) * BV + tx + 16 * j] = acc[i][j];
      }
      for (int f = tid; f < kBucket; f += blockDim.x) {
        float x = 0.0f;
        for (int s = 0; s < n; ++s) x += ks[s * LD + f] * ws[s];
        zs[f] = G * zs[f] + x;
      }
    }
    __syncthreads();
  }

  if (p.final_s != nullptr && !parallel) {
    for (int i = tid; i < F * BV; i += blockDim.x) {
      const int f = i / BV, c = i - f * BV;
      if (c < ncols) {
        p.final_s[b * p.final_s_stride[0] + h * p.final_s_stride[1] + f * p.final_s_stride[2] +
                  (c0 + c) * p.final_s_stride[3]] = Ss[f * BV + c];
      }
    }
  }
  if (p.final_z != nullptr && blockIdx.y == 0 && !parallel) {
    for (int f = tid; f < F; f += blockDim.x) {
      const int64_t at = b * p.final_z_stride[0] + h * p.final_z_stride[1];
      p.final_z[at + f * p.final_z_stride[2]] = zs[f];
    }
  }
}

inline cudaError_t set_smem(const void* kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

}  // namespace lin
}  // namespace cuda
}  // namespace pyattn
