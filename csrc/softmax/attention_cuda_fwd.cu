// Tensor-core fused softmax attention forward (float16 / bfloat16 inputs, float32
// accumulation) in the FlashAttention-2 design: a CTA of 4 warps owns 64 query rows of one
// (batch, head), each warp 16 of them; K and V tiles stream through shared memory
// (cp.async, the V load overlapping Q K^T and the next K load overlapping P V), scores stay
// in registers and go straight from the accumulator fragments into the A operand of P V.
// Semantics of the CPU kernel: arbitrary strides, GQA, bottom-right causal mask, sliding
// window, softcap, lse. Tile sizes and shared memory: attention_cuda_mma_plan.h.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../common/cuda_launch_macro.h"
#include "../common/cuda_mma.cuh"
#include "attention_cuda_kernels.h"
#include "attention_cuda_mma_plan.h"
#include "attention_cuda_tiles.cuh"

namespace pyattn {
namespace cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float fast_exp2(float x) {
#if defined(PYATTN_CUDA_EMULATION)
  return pyattn_emu::ex2_approx_ftz(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));  // ex2(-inf) = +0
  return y;
#endif
}

struct FwdArgs {
  SoftmaxFwdParams p;
  int64_t q_blocks, n_ctas, group;
  float score_mul;  // no softcap: scale * log2(e); softcap: scale / softcap
  float cap_mul;    // softcap * log2(e)
  bool softcap;
  bool q_vec, k_vec, v_vec, out_pair;
};

// Scores of a warp's 16 rows against the kBlockN keys of the K tile, log2 units:
// S = log2(e) * scale * Q K^T, or log2(e) * softcap * tanh(scale * Q K^T / softcap).
template <typename T, int kHeadDim, int kBlockN>
__device__ __forceinline__ void fwd_scores(float (&s)[kBlockN / 8][4], uint32_t q_base, uint32_t k_base,
                                           int warp_row, int lane, int head_dim, const FwdArgs& a) {
#pragma unroll
  for (int nt = 0; nt < kBlockN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    // Chunks past the head dim hold zeros: skipped, by an `if` (a break made ptxas spill).
    if (kk * 16 < head_dim) {
      uint32_t qa[4];
      tiles::load_a<kHeadDim>(qa, q_base, warp_row, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < kBlockN / 16; ++np) {
        uint32_t kb[4];
        tiles::load_b_nk<kHeadDim>(kb, k_base, np * 16, kk * 16, lane);
        mma::mma_16816<T>(s[2 * np], qa, kb[0], kb[1]);
        mma::mma_16816<T>(s[2 * np + 1], qa, kb[2], kb[3]);
      }
    }
  }
#pragma unroll
  for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = a.softcap ? a.cap_mul * tanhf(s[nt][e] * a.score_mul) : s[nt][e] * a.score_mul;
    }
  }
}

// Sets the scores of keys outside [lo[r], hi[r]] (row g: r = 0, row g + 8: r = 1) to -inf;
// n0 is the first key of the tile. hi <= seq_k - 1 also masks the keys past the end.
template <int kBlockN>
__device__ __forceinline__ void fwd_mask(float (&s)[kBlockN / 8][4], int n0, const int (&lo)[2],
                                         const int (&hi)[2], int lane) {
#pragma unroll
  for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = n0 + 8 * nt + mma::c_col(lane, e), r = e >> 1;
      if (j < lo[r] || j > hi[r]) s[nt][e] = -INFINITY;
    }
  }
}

// Online softmax step: with m the running row maxima (log2 units) and l the running partial
// row sums of this lane, turns the scores into p = exp2(s - m_new) in place, rescales the
// output rows and l by alpha = exp2(m_old - m_new). Rows with every score -inf so far keep
// m = -inf and contribute p = 0 (m_new is then replaced by 0 in the exponents).
template <int kBlockN, int kOutTiles>
__device__ __forceinline__ void fwd_softmax_step(float (&s)[kBlockN / 8][4], float (&o)[kOutTiles][4],
                                                 float (&m)[2], float (&l)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    mx = mma::quad_max(mx);
    const float m_new = fmaxf(m[r], mx);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = fast_exp2(m[r] - m_use);
    m[r] = m_new;
    float sum = 0.0f;
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      s[nt][2 * r] = fast_exp2(s[nt][2 * r] - m_use);
      s[nt][2 * r + 1] = fast_exp2(s[nt][2 * r + 1] - m_use);
      sum += s[nt][2 * r] + s[nt][2 * r + 1];
    }
    l[r] = l[r] * alpha + sum;
#pragma unroll
    for (int dt = 0; dt < kOutTiles; ++dt) {
      o[dt][2 * r] *= alpha;
      o[dt][2 * r + 1] *= alpha;
    }
  }
}

__device__ __forceinline__ int clamp_int(int64_t x, int lo, int hi) {
  return static_cast<int>(x < lo ? lo : (x > hi ? hi : x));
}

// out[b, h, i, :] = sum_j softmax_j(S_ij) V[b, h / group, j, :] and lse[b, h, i] = log sum_j
// exp(S_ij) over the visible keys j of row i, S_ij = scale * q_i . k_j (softcapped), for the
// 64 rows of each CTA index; a grid-stride loop covers more CTAs than the grid holds.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kMmaThreads) softmax_fwd_mma_kernel(const FwdArgs a) {
  constexpr int kBlockM = kFwdBlockM, kBlockN = MmaTiles<kHeadDim>::kFwdBlockN;
  constexpr int kPitch = MmaTiles<kHeadDim>::kPitch;
  PYATTN_DYNAMIC_SMEM(__align__(16) unsigned char, smem_raw);
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* k_s = q_s + kBlockM * kPitch;
  T* v_s = k_s + kBlockN * kPitch;
  const uint32_t q_base = mma::smem_addr(q_s), k_base = mma::smem_addr(k_s), v_base = mma::smem_addr(v_s);

  const SoftmaxFwdParams& p = a.p;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  const int seq_k = static_cast<int>(p.seq_k);

  for (int64_t cta = blockIdx.x; cta < a.n_ctas; cta += gridDim.x) {
    // Last query blocks first: under a causal mask they see the most keys.
    const int64_t qb = a.q_blocks - 1 - cta % a.q_blocks, bh = cta / a.q_blocks;
    const int64_t b = bh / p.heads_q, h = bh % p.heads_q, kvh = h / a.group;
    const int64_t m0 = qb * kBlockM;
    const int rows_valid = static_cast<int>(p.seq_q - m0 < kBlockM ? p.seq_q - m0 : kBlockM);
    const T* q_g = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + m0 * p.q_stride[2];
    const T* k_g = static_cast<const T*>(p.k) + b * p.k_stride[0] + kvh * p.k_stride[1];
    const T* v_g = static_cast<const T*>(p.v) + b * p.v_stride[0] + kvh * p.v_stride[1];

    // key_lo and key_hi are non-decreasing in i, so the CTA's rows see at most keys
    // [lo(first row), hi(last row)], and every key in [lo(last row), hi(first row)] is
    // visible to all of them (no masking needed for a tile inside it).
    const int64_t last = m0 + rows_valid - 1;
    const int kmin = clamp_int(p.key_lo(m0), 0, INT_MAX), kmax = clamp_int(p.key_hi(last), -1, INT_MAX);
    const int all_lo = clamp_int(p.key_lo(last), 0, INT_MAX), all_hi = clamp_int(p.key_hi(m0), -1, INT_MAX);
    int lo[2], hi[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = m0 + warp * 16 + mma::c_row(lane, 2 * r);
      lo[r] = i < p.seq_q ? clamp_int(p.key_lo(i), 0, INT_MAX) : 1;
      hi[r] = i < p.seq_q ? clamp_int(p.key_hi(i), -1, INT_MAX) : 0;
    }

    float o[kHeadDim / 8][4];
#pragma unroll
    for (int dt = 0; dt < kHeadDim / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

    const int nb_first = kmin / kBlockN, nb_last = kmax >= kmin ? kmax / kBlockN : nb_first - 1;
    if (nb_first <= nb_last) {
      tiles::load_tile<T, kBlockM, kHeadDim, kMmaThreads>(q_s, q_g, p.q_stride[2], p.q_stride[3], rows_valid, D,
                                                           a.q_vec);
      const int n_first = nb_first * kBlockN;
      tiles::load_tile<T, kBlockN, kHeadDim, kMmaThreads>(k_s, k_g + n_first * p.k_stride[2], p.k_stride[2],
                                                           p.k_stride[3], seq_k - n_first, D, a.k_vec);
      mma::cp_async_commit();
    }
    for (int nb = nb_first; nb <= nb_last; ++nb) {
      const int n0 = nb * kBlockN;
      mma::cp_async_wait<0>();
      __syncthreads();  // K tile nb (and Q) landed; every warp is done with the previous V tile
      tiles::load_tile<T, kBlockN, kHeadDim, kMmaThreads>(v_s, v_g + n0 * p.v_stride[2], p.v_stride[2],
                                                           p.v_stride[3], seq_k - n0, Dv, a.v_vec);
      mma::cp_async_commit();

      float s[kBlockN / 8][4];
      fwd_scores<T, kHeadDim, kBlockN>(s, q_base, k_base, warp * 16, lane, D, a);
      if (n0 < all_lo || n0 + kBlockN - 1 > all_hi) fwd_mask<kBlockN>(s, n0, lo, hi, lane);

      mma::cp_async_wait<0>();
      __syncthreads();  // V tile landed; every warp is done with the K tile
      if (nb < nb_last) {
        const int n1 = n0 + kBlockN;
        tiles::load_tile<T, kBlockN, kHeadDim, kMmaThreads>(k_s, k_g + n1 * p.k_stride[2], p.k_stride[2],
                                                             p.k_stride[3], seq_k - n1, D, a.k_vec);
        mma::cp_async_commit();
      }
      fwd_softmax_step<kBlockN, kHeadDim / 8>(s, o, m, l);
      tiles::accumulate_c_kn<T, kHeadDim, kBlockN>(o, s, v_base, lane, Dv);  // O += P V
    }

    // Epilogue: normalise and store; rows that saw no key have l = 0 and get zeros.
    float inv_l[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[r] = mma::quad_sum(l[r]);
      inv_l[r] = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    }
    T* out_g = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + m0 * p.out_stride[2];
    tiles::store_c<T, kHeadDim / 8>(out_g, p.out_stride[2], p.out_stride[3], o, inv_l, warp * 16, rows_valid, Dv,
                                    a.out_pair, lane);
    if (p.lse != nullptr && (lane & 3) == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = warp * 16 + mma::c_row(lane, 2 * r);
        if (row < rows_valid) {
          p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + (m0 + row) * p.lse_stride[2]] =
              l[r] > 0.0f ? (m[r] + __log2f(l[r])) * kLn2 : -INFINITY;
        }
      }
    }
    __syncthreads();  // the next CTA index reuses the shared tiles
  }
}

}  // namespace

template <typename T, int kHeadDim>
cudaError_t softmax_fwd_mma(const SoftmaxFwdParams& p, const LaunchPlan& plan, cudaStream_t stream) {
  FwdArgs a;
  a.p = p;
  a.q_blocks = (p.seq_q + kFwdBlockM - 1) / kFwdBlockM;
  a.n_ctas = p.batch * p.heads_q * a.q_blocks;
  if (a.n_ctas <= 0) return cudaSuccess;
  a.group = p.heads_kv > 0 ? p.heads_q / p.heads_kv : 1;
  a.softcap = p.softcap > 0.0f;
  a.score_mul = a.softcap ? p.scale / p.softcap : p.scale * kLog2e;
  a.cap_mul = p.softcap * kLog2e;
  a.q_vec = tiles::rows_16b_aligned(p.q, p.q_stride);
  a.k_vec = tiles::rows_16b_aligned(p.k, p.k_stride);
  a.v_vec = tiles::rows_16b_aligned(p.v, p.v_stride);
  a.out_pair = tiles::rows_4b_aligned(p.out, p.out_stride);

  const auto kernel = softmax_fwd_mma_kernel<T, kHeadDim>;
  const int smem = static_cast<int>(plan.smem_bytes);
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  const int64_t grid = a.n_ctas < kMaxGridX ? a.n_ctas : kMaxGridX;
  PYATTN_LAUNCH(kernel, static_cast<unsigned>(grid), kMmaThreads, smem, stream)(a);
  return cudaGetLastError();
}

#define PYATTN_INSTANTIATE_FWD(T, D) \
  template cudaError_t softmax_fwd_mma<T, D>(const SoftmaxFwdParams&, const LaunchPlan&, cudaStream_t);
PYATTN_INSTANTIATE_FWD(__half, 64)
PYATTN_INSTANTIATE_FWD(__half, 128)
PYATTN_INSTANTIATE_FWD(__half, 256)
PYATTN_INSTANTIATE_FWD(__nv_bfloat16, 64)
PYATTN_INSTANTIATE_FWD(__nv_bfloat16, 128)
PYATTN_INSTANTIATE_FWD(__nv_bfloat16, 256)
#undef PYATTN_INSTANTIATE_FWD

}  // namespace cuda
}  // namespace pyattn
