// Tensor-core fused softmax attention backward (float16 / bfloat16, float32 accumulation),
// FlashAttention-2 style. With S the final scores (log2 units inside the kernels), the
// forward's lse, P = exp(S - lse), c' = 1 - tanh^2 the softcap's derivative (1 without):
//
//   dV = P^T dO    dP = dO V^T    dS = P * (dP - delta),  delta = rowsum(dO * O) - dlse
//   dQ = scale * (dS * c') K      dK = scale * (dS * c')^T Q
//
// Kernels on one stream: bwd_prepare (delta, lse in log2 units, zeroed dq accumulator, one
// warp per query row), the main kernel (a CTA per (batch, kv head, 64-key block, query-head
// split) sweeping its query heads of the group and every query block that sees its keys; dK,
// dV stay in registers, dQ goes into the float32 accumulator with atomics), bwd_convert_dq
// (the accumulator into dq's dtype and strides) and, when the group is split over several
// CTAs (plan.num_splits > 1), bwd_convert_dkv (the float32 dK, dV sums the splits added into).
// Tiles and workspace: attention_cuda_mma_plan.h.

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

__device__ __forceinline__ float fast_exp2(float x) {
#if defined(PYATTN_CUDA_EMULATION)
  return pyattn_emu::ex2_approx_ftz(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));  // ex2(-inf) = +0
  return y;
#endif
}

// Which dK / dV the main kernel computes: both (head dims <= 128) or, at 256 where the two
// accumulators do not fit in registers together, one of them per launch.
enum BwdMode : int { kBwdBoth = 0, kBwdOnlyDV = 1, kBwdOnlyDKDQ = 2 };

struct BwdArgs {
  SoftmaxBwdParams p;
  int64_t k_blocks, n_ctas, group, rows;  // rows = batch * heads_q * seq_q
  int64_t splits, heads_per_split;         // query heads of a group split over CTAs
  int64_t kv_rows;                         // batch * heads_kv * seq_k
  float* dq_acc;                           // workspace: (rows, head_dim)
  float* delta;                            // workspace: (rows)
  float* lse2;                             // workspace: (rows)
  float* dk_acc;                           // workspace when splits > 1: (kv_rows, head_dim)
  float* dv_acc;                           // workspace when splits > 1: (kv_rows, head_dim_v)
  float score_mul;  // no softcap: scale * log2(e); softcap: scale / softcap
  float cap_mul;    // softcap * log2(e)
  float scale;
  bool softcap;
  // Key j is visible to query i iff dmin <= j - i <= dmax and j < seq_k (the causal and
  // window bounds of params.h rewritten on the diagonal offset; INT_MIN / INT_MAX: none).
  int dmin, dmax;
  bool q_vec, k_vec, v_vec, do_vec, dk_pair, dv_pair;
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Per query row i of (b, h): delta_i = sum_d dO_id O_id - dlse_i, lse2_i = lse_i log2(e)
// (+inf where lse = -inf, so that exp2(s - lse2) = 0 for rows that see no key), and a zero
// dq accumulator row. One warp per row.
template <typename T>
__global__ void __launch_bounds__(kBwdRowWarps * 32) bwd_prepare_kernel(const BwdArgs a) {
  const SoftmaxFwdParams& f = a.p.fwd;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kBwdRowWarps;
  for (int64_t row = blockIdx.x * int64_t{kBwdRowWarps} + threadIdx.x / 32; row < a.rows; row += warps) {
    const int64_t i = row % f.seq_q, bh = row / f.seq_q, h = bh % f.heads_q, b = bh / f.heads_q;
    const T* o = static_cast<const T*>(f.out) + b * f.out_stride[0] + h * f.out_stride[1] + i * f.out_stride[2];
    const T* d_o =
        static_cast<const T*>(a.p.dout) + b * a.p.dout_stride[0] + h * a.p.dout_stride[1] + i * a.p.dout_stride[2];
    float acc = 0.0f;
    for (int64_t d = lane; d < f.head_dim_v; d += 32) {
      acc += mma::to_float(o[d * f.out_stride[3]]) * mma::to_float(d_o[d * a.p.dout_stride[3]]);
    }
    acc = warp_sum(acc);
    float* dq_row = a.dq_acc + row * f.head_dim;
    for (int64_t d = lane; d < f.head_dim; d += 32) dq_row[d] = 0.0f;
    if (lane == 0) {
      const float dlse = a.p.dlse != nullptr
                             ? a.p.dlse[b * a.p.dlse_stride[0] + h * a.p.dlse_stride[1] + i * a.p.dlse_stride[2]]
                             : 0.0f;
      const float lse = f.lse[b * f.lse_stride[0] + h * f.lse_stride[1] + i * f.lse_stride[2]];
      a.delta[row] = acc - dlse;
      a.lse2[row] = lse == -INFINITY ? INFINITY : lse * kLog2e;
    }
  }
}

// dq[b, h, i, :] = the float32 accumulator row, in dq's dtype and strides. One warp per row.
template <typename T>
__global__ void __launch_bounds__(kBwdRowWarps * 32) bwd_convert_dq_kernel(const BwdArgs a) {
  const SoftmaxFwdParams& f = a.p.fwd;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kBwdRowWarps;
  for (int64_t row = blockIdx.x * int64_t{kBwdRowWarps} + threadIdx.x / 32; row < a.rows; row += warps) {
    const int64_t i = row % f.seq_q, bh = row / f.seq_q, h = bh % f.heads_q, b = bh / f.heads_q;
    T* dq = static_cast<T*>(a.p.dq) + b * a.p.dq_stride[0] + h * a.p.dq_stride[1] + i * a.p.dq_stride[2];
    const float* acc = a.dq_acc + row * f.head_dim;
    for (int64_t d = lane; d < f.head_dim; d += 32) dq[d * a.p.dq_stride[3]] = mma::from_float<T>(acc[d]);
  }
}

// dk[b, kvh, j, :] and dv[b, kvh, j, :] = the float32 sums of the query-head splits, in the
// dtype and strides of dk, dv. One warp per key row.
template <typename T>
__global__ void __launch_bounds__(kBwdRowWarps * 32) bwd_convert_dkv_kernel(const BwdArgs a) {
  const SoftmaxFwdParams& f = a.p.fwd;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kBwdRowWarps;
  for (int64_t row = blockIdx.x * int64_t{kBwdRowWarps} + threadIdx.x / 32; row < a.kv_rows; row += warps) {
    const int64_t j = row % f.seq_k, bkv = row / f.seq_k, kvh = bkv % f.heads_kv, b = bkv / f.heads_kv;
    T* dk = static_cast<T*>(a.p.dk) + b * a.p.dk_stride[0] + kvh * a.p.dk_stride[1] + j * a.p.dk_stride[2];
    T* dv = static_cast<T*>(a.p.dv) + b * a.p.dv_stride[0] + kvh * a.p.dv_stride[1] + j * a.p.dv_stride[2];
    const float* dk_row = a.dk_acc + row * f.head_dim;
    const float* dv_row = a.dv_acc + row * f.head_dim_v;
    for (int64_t d = lane; d < f.head_dim; d += 32) dk[d * a.p.dk_stride[3]] = mma::from_float<T>(dk_row[d]);
    for (int64_t d = lane; d < f.head_dim_v; d += 32) dv[d * a.p.dv_stride[3]] = mma::from_float<T>(dv_row[d]);
  }
}

// Adds a warp's 16-key accumulator rows (row0.., keys < rows_valid, columns < cols) into a
// row-major float32 matrix with `cols` columns.
template <int kTiles>
__device__ __forceinline__ void atomic_add_c(float* g, const float (&c)[kTiles][4], int row0, int rows_valid,
                                             int cols, int lane) {
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = row0 + mma::c_row(lane, e), col = 8 * nt + mma::c_col(lane, e);
      if (r < rows_valid && col < cols) atomicAdd(g + static_cast<int64_t>(r) * cols + col, c[nt][e]);
    }
  }
}

// Smallest query row in [0, seq_q] whose last visible key is >= n0 (key_hi is non-decreasing).
__device__ int64_t first_row_reaching(const SoftmaxFwdParams& f, int64_t n0) {
  int64_t lo = 0, hi = f.seq_q;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (f.key_hi(mid) >= n0) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// Largest query row in [-1, seq_q - 1] whose first visible key is <= n1 (key_lo is
// non-decreasing).
__device__ int64_t last_row_reaching(const SoftmaxFwdParams& f, int64_t n1) {
  int64_t lo = -1, hi = f.seq_q - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (f.key_lo(mid) <= n1) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// S^T (the warp's 16 keys x kBlockM queries) = K Q^T, then P^T = exp2(S - lse2) in place
// (log2 units, masked entries 0).
template <typename T, int kHeadDim, int kBlockM>
__device__ __forceinline__ void bwd_probs(float (&pt)[kBlockM / 8][4], uint32_t k_base, uint32_t q_base,
                                          const float* lse_s, int warp, int lane, int n0, int64_t m0,
                                          bool masked, const BwdArgs& a) {
  const int D = static_cast<int>(a.p.fwd.head_dim);
#pragma unroll
  for (int nt = 0; nt < kBlockM / 8; ++nt) pt[nt][0] = pt[nt][1] = pt[nt][2] = pt[nt][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    // Chunks past the head dim hold zeros: skipped, by an `if` (a break made ptxas spill).
    if (kk * 16 < D) {
      uint32_t ka[4];
      tiles::load_a<kHeadDim>(ka, k_base, warp * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < kBlockM / 16; ++np) {
        uint32_t qb[4];
        tiles::load_b_nk<kHeadDim>(qb, q_base, np * 16, kk * 16, lane);
        mma::mma_16816<T>(pt[2 * np], ka, qb[0], qb[1]);
        mma::mma_16816<T>(pt[2 * np + 1], ka, qb[2], qb[3]);
      }
    }
  }
  const int seq_k = static_cast<int>(a.p.fwd.seq_k);
#pragma unroll
  for (int nt = 0; nt < kBlockM / 8; ++nt) {
    const float2 l2 = *reinterpret_cast<const float2*>(lse_s + 8 * nt + mma::c_col(lane, 0));
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float s = a.softcap ? a.cap_mul * tanhf(pt[nt][e] * a.score_mul) : pt[nt][e] * a.score_mul;
      if (masked) {
        const int j = n0 + warp * 16 + mma::c_row(lane, e);
        const int64_t i = m0 + 8 * nt + mma::c_col(lane, e);
        const int64_t d = j - i;
        if (j >= seq_k || d < a.dmin || d > a.dmax) s = -INFINITY;
      }
      pt[nt][e] = fast_exp2(s - ((e & 1) ? l2.y : l2.x));
    }
  }
}

// dS^T * c' * scale in place of dP^T: dP^T = V dO^T for the warp's 16 keys, then
// dS = P (dP - delta) (1 - t^2) scale, with t = tanh(..) recovered from P as
// (log2 P + lse2) / cap_mul under a softcap. Entries with P = 0 give 0 (no inf * 0).
template <typename T, int kHeadDim, int kBlockM>
__device__ __forceinline__ void bwd_dscores(float (&ds)[kBlockM / 8][4], const float (&pt)[kBlockM / 8][4],
                                            uint32_t v_base, uint32_t do_base, const float* lse_s,
                                            const float* delta_s, int warp, int lane, const BwdArgs& a) {
  const int Dv = static_cast<int>(a.p.fwd.head_dim_v);
#pragma unroll
  for (int nt = 0; nt < kBlockM / 8; ++nt) ds[nt][0] = ds[nt][1] = ds[nt][2] = ds[nt][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    if (kk * 16 < Dv) {
      uint32_t va[4];
      tiles::load_a<kHeadDim>(va, v_base, warp * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < kBlockM / 16; ++np) {
        uint32_t dob[4];
        tiles::load_b_nk<kHeadDim>(dob, do_base, np * 16, kk * 16, lane);
        mma::mma_16816<T>(ds[2 * np], va, dob[0], dob[1]);
        mma::mma_16816<T>(ds[2 * np + 1], va, dob[2], dob[3]);
      }
    }
  }
  const float inv_cap_mul = a.softcap ? 1.0f / a.cap_mul : 0.0f;
#pragma unroll
  for (int nt = 0; nt < kBlockM / 8; ++nt) {
    const int col = 8 * nt + mma::c_col(lane, 0);
    const float2 dl = *reinterpret_cast<const float2*>(delta_s + col);
    const float2 l2 = *reinterpret_cast<const float2*>(lse_s + col);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float p = pt[nt][e];
      float g = p * (ds[nt][e] - ((e & 1) ? dl.y : dl.x)) * a.scale;
      if (a.softcap && p > 0.0f) {
        const float t = (__log2f(p) + ((e & 1) ? l2.y : l2.x)) * inv_cap_mul;
        g *= 1.0f - t * t;
      }
      ds[nt][e] = p > 0.0f ? g : 0.0f;
    }
  }
}

// dQ rows [m0, m0 + kBlockM) += dS (kBlockM x 64 keys, from the shared dS^T tile) K, by tasks
// of 16 rows x 32 columns spread over the warps, added into the float32 accumulator.
template <typename T, int kHeadDim, int kBlockM>
__device__ __forceinline__ void bwd_dq(uint32_t ds_base, uint32_t k_base, float* dq_rows, int rows_valid,
                                       int warp, int lane, int head_dim) {
  constexpr int kChunks = kHeadDim / 32, kTasks = (kBlockM / 16) * kChunks;
  for (int task = warp; task < kTasks; task += kMmaWarps) {
    const int rt = task / kChunks, cc = task % kChunks;
    if (cc * 32 >= head_dim) continue;
    float acc[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kBwdBlockN / 16; ++kk) {
      uint32_t da[4];
      tiles::load_a_trans<kBlockM>(da, ds_base, kk * 16, rt * 16, lane);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        uint32_t kb[4];
        tiles::load_b_kn<kHeadDim>(kb, k_base, kk * 16, cc * 32 + j * 16, lane);
        mma::mma_16816<T>(acc[2 * j], da, kb[0], kb[1]);
        mma::mma_16816<T>(acc[2 * j + 1], da, kb[2], kb[3]);
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = rt * 16 + mma::c_row(lane, e), c = cc * 32 + 8 * j + mma::c_col(lane, e);
        if (r < rows_valid && c < head_dim) atomicAdd(dq_rows + static_cast<int64_t>(r) * head_dim + c, acc[j][e]);
      }
    }
  }
}

// Writes a warp's 16-key rows of dS^T (C layout) into the shared [key][query] tile as T.
template <typename T, int kBlockM>
__device__ __forceinline__ void bwd_store_ds(T* ds_s, const float (&ds)[kBlockM / 8][4], int warp, int lane) {
  constexpr int kPitchS = kBlockM + 8;
#pragma unroll
  for (int nt = 0; nt < kBlockM / 8; ++nt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = warp * 16 + mma::c_row(lane, 2 * half), c = 8 * nt + mma::c_col(lane, 0);
      *reinterpret_cast<uint32_t*>(ds_s + r * kPitchS + c) = mma::pack2<T>(ds[nt][2 * half], ds[nt][2 * half + 1]);
    }
  }
}

// For the 64 keys [n0, n0 + 64) of kv head kvh of batch b (one CTA index; grid-stride loop):
// dV = sum over the query heads h of the CTA's split of the group and rows i of P_ij dO_i,
// dK = sum of scale dS_ij c'_ij Q_i, and dQ_i += scale dS_ij c'_ij K_j into the float32
// accumulator; only the query blocks holding rows that see some key of the block are
// visited. With one split dK, dV are stored, else added into their float32 accumulators.
template <typename T, int kHeadDim, int kMode>
__global__ void __launch_bounds__(kMmaThreads) softmax_bwd_mma_kernel(const BwdArgs a) {
  constexpr int kBlockN = kBwdBlockN, kBlockM = MmaTiles<kHeadDim>::kBwdBlockM;
  constexpr int kPitch = MmaTiles<kHeadDim>::kPitch, kPitchS = MmaTiles<kHeadDim>::kBwdPitchS;
  constexpr bool kDV = kMode != kBwdOnlyDKDQ, kDK = kMode != kBwdOnlyDV;
  PYATTN_DYNAMIC_SMEM(__align__(16) unsigned char, smem_raw);
  T* k_s = reinterpret_cast<T*>(smem_raw);
  T* v_s = k_s + kBlockN * kPitch;
  T* q_s = v_s + kBlockN * kPitch;
  T* do_s = q_s + kBlockM * kPitch;
  T* ds_s = do_s + kBlockM * kPitch;
  float* lse_s = reinterpret_cast<float*>(ds_s + kBlockN * kPitchS);
  float* delta_s = lse_s + kBlockM;
  const uint32_t k_base = mma::smem_addr(k_s), v_base = mma::smem_addr(v_s), q_base = mma::smem_addr(q_s);
  const uint32_t do_base = mma::smem_addr(do_s), ds_base = mma::smem_addr(ds_s);

  const SoftmaxBwdParams& p = a.p;
  const SoftmaxFwdParams& f = p.fwd;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = static_cast<int>(f.head_dim), Dv = static_cast<int>(f.head_dim_v);
  const int seq_k = static_cast<int>(f.seq_k);

  for (int64_t cta = blockIdx.x; cta < a.n_ctas; cta += gridDim.x) {
    const int64_t nb = cta % a.k_blocks, split = (cta / a.k_blocks) % a.splits;
    const int64_t bkv = cta / a.k_blocks / a.splits;
    const int64_t b = bkv / f.heads_kv, kvh = bkv % f.heads_kv;
    const int n0 = static_cast<int>(nb * kBlockN);
    const int keys_valid = seq_k - n0 < kBlockN ? seq_k - n0 : kBlockN;
    const T* k_g = static_cast<const T*>(f.k) + b * f.k_stride[0] + kvh * f.k_stride[1] + n0 * f.k_stride[2];
    const T* v_g = static_cast<const T*>(f.v) + b * f.v_stride[0] + kvh * f.v_stride[1] + n0 * f.v_stride[2];
    tiles::load_tile<T, kBlockN, kHeadDim, kMmaThreads>(k_s, k_g, f.k_stride[2], f.k_stride[3], keys_valid, D,
                                                         a.k_vec);
    if constexpr (kDK) {
      tiles::load_tile<T, kBlockN, kHeadDim, kMmaThreads>(v_s, v_g, f.v_stride[2], f.v_stride[3], keys_valid, Dv,
                                                           a.v_vec);
    }
    mma::cp_async_commit();  // waited for with the first query block

    float dk[kDK ? kHeadDim / 8 : 1][4], dv[kDV ? kHeadDim / 8 : 1][4];
#pragma unroll
    for (int t = 0; t < (kDK ? kHeadDim / 8 : 1); ++t) dk[t][0] = dk[t][1] = dk[t][2] = dk[t][3] = 0.0f;
#pragma unroll
    for (int t = 0; t < (kDV ? kHeadDim / 8 : 1); ++t) dv[t][0] = dv[t][1] = dv[t][2] = dv[t][3] = 0.0f;

    const int64_t i_first = first_row_reaching(f, n0), i_last = last_row_reaching(f, n0 + keys_valid - 1);
    const int64_t mb_first = i_first / kBlockM, mb_last = i_first <= i_last ? i_last / kBlockM : mb_first - 1;
    const int64_t hg_end = (split + 1) * a.heads_per_split < a.group ? (split + 1) * a.heads_per_split : a.group;
    for (int64_t hg = split * a.heads_per_split; hg < hg_end && mb_first <= mb_last; ++hg) {
      const int64_t h = kvh * a.group + hg, bh = b * f.heads_q + h;
      for (int64_t mb = mb_first; mb <= mb_last; ++mb) {
        const int64_t m0 = mb * kBlockM;
        const int rows_valid = static_cast<int>(f.seq_q - m0 < kBlockM ? f.seq_q - m0 : kBlockM);
        const T* q_g = static_cast<const T*>(f.q) + b * f.q_stride[0] + h * f.q_stride[1] + m0 * f.q_stride[2];
        const T* do_g = static_cast<const T*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1] +
                        m0 * p.dout_stride[2];
        tiles::load_tile<T, kBlockM, kHeadDim, kMmaThreads>(q_s, q_g, f.q_stride[2], f.q_stride[3], rows_valid, D,
                                                             a.q_vec);
        tiles::load_tile<T, kBlockM, kHeadDim, kMmaThreads>(do_s, do_g, p.dout_stride[2], p.dout_stride[3],
                                                             rows_valid, Dv, a.do_vec);
        mma::cp_async_commit();
        if (threadIdx.x < kBlockM) {
          // Rows past seq_q get lse2 = +inf: P = 0 there without masking.
          const bool valid = static_cast<int>(threadIdx.x) < rows_valid;
          const int64_t row = bh * f.seq_q + m0 + threadIdx.x;
          lse_s[threadIdx.x] = valid ? a.lse2[row] : INFINITY;
          delta_s[threadIdx.x] = valid ? a.delta[row] : 0.0f;
        }
        mma::cp_async_wait<0>();
        __syncthreads();  // Q, dO (and K, V) tiles landed

        // Masking is needed unless every (row, key) of the tile pair is visible.
        const int64_t d_lo = n0 - (m0 + kBlockM - 1), d_hi = n0 + kBlockN - 1 - m0;
        const bool masked = d_lo < a.dmin || d_hi > a.dmax || n0 + kBlockN > seq_k;
        float pt[kBlockM / 8][4];
        bwd_probs<T, kHeadDim, kBlockM>(pt, k_base, q_base, lse_s, warp, lane, n0, m0, masked, a);
        if constexpr (kDV) tiles::accumulate_c_kn<T, kHeadDim, kBlockM>(dv, pt, do_base, lane, Dv);
        if constexpr (kDK) {
          float ds[kBlockM / 8][4];
          bwd_dscores<T, kHeadDim, kBlockM>(ds, pt, v_base, do_base, lse_s, delta_s, warp, lane, a);
          bwd_store_ds<T, kBlockM>(ds_s, ds, warp, lane);
          tiles::accumulate_c_kn<T, kHeadDim, kBlockM>(dk, ds, q_base, lane, D);
          __syncthreads();  // the dS^T tile is complete
          bwd_dq<T, kHeadDim, kBlockM>(ds_base, k_base, a.dq_acc + (bh * f.seq_q + m0) * f.head_dim, rows_valid,
                                       warp, lane, D);
        }
        __syncthreads();  // the next query block overwrites Q, dO, dS^T, lse, delta
      }
    }
    mma::cp_async_wait<0>();  // K, V loads of a CTA that visited no query block

    const float one[2] = {1.0f, 1.0f};
    const int64_t kv_row0 = bkv * f.seq_k + n0;  // first key row of the block in the accumulators
    if constexpr (kDK) {
      if (a.splits > 1) {
        atomic_add_c<kHeadDim / 8>(a.dk_acc + kv_row0 * D, dk, warp * 16, keys_valid, D, lane);
      } else {
        T* dk_g = static_cast<T*>(p.dk) + b * p.dk_stride[0] + kvh * p.dk_stride[1] + n0 * p.dk_stride[2];
        tiles::store_c<T, kHeadDim / 8>(dk_g, p.dk_stride[2], p.dk_stride[3], dk, one, warp * 16, keys_valid, D,
                                        a.dk_pair, lane);
      }
    }
    if constexpr (kDV) {
      if (a.splits > 1) {
        atomic_add_c<kHeadDim / 8>(a.dv_acc + kv_row0 * Dv, dv, warp * 16, keys_valid, Dv, lane);
      } else {
        T* dv_g = static_cast<T*>(p.dv) + b * p.dv_stride[0] + kvh * p.dv_stride[1] + n0 * p.dv_stride[2];
        tiles::store_c<T, kHeadDim / 8>(dv_g, p.dv_stride[2], p.dv_stride[3], dv, one, warp * 16, keys_valid, Dv,
                                        a.dv_pair, lane);
      }
    }
    __syncthreads();  // the next CTA index overwrites the K, V tiles
  }
}

int clamp_to_int(int64_t x) {
  return static_cast<int>(x < INT_MIN ? INT_MIN : (x > INT_MAX ? INT_MAX : x));
}

template <typename T, int kHeadDim, int kMode>
cudaError_t launch_main(const BwdArgs& a, int smem, cudaStream_t stream) {
  const auto kernel = softmax_bwd_mma_kernel<T, kHeadDim, kMode>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  const int64_t grid = a.n_ctas < kMaxGridX ? a.n_ctas : kMaxGridX;
  PYATTN_LAUNCH(kernel, static_cast<unsigned>(grid), kMmaThreads, smem, stream)(a);
  return cudaGetLastError();
}

}  // namespace

template <typename T, int kHeadDim>
cudaError_t softmax_bwd_mma(const SoftmaxBwdParams& p, const LaunchPlan& plan, float* workspace,
                            cudaStream_t stream) {
  const SoftmaxFwdParams& f = p.fwd;
  BwdArgs a;
  a.p = p;
  a.rows = f.batch * f.heads_q * f.seq_q;
  a.k_blocks = (f.seq_k + kBwdBlockN - 1) / kBwdBlockN;
  a.group = f.heads_kv > 0 ? f.heads_q / f.heads_kv : 1;
  a.splits = plan.num_splits > 1 ? plan.num_splits : 1;
  a.heads_per_split = (a.group + a.splits - 1) / a.splits;
  a.n_ctas = f.batch * f.heads_kv * a.k_blocks * a.splits;
  a.kv_rows = f.batch * f.heads_kv * f.seq_k;
  a.dq_acc = workspace;
  a.delta = workspace + a.rows * f.head_dim;
  a.lse2 = a.delta + a.rows;
  a.dk_acc = a.lse2 + a.rows;
  a.dv_acc = a.dk_acc + a.kv_rows * f.head_dim;
  a.softcap = f.softcap > 0.0f;
  a.score_mul = a.softcap ? f.scale / f.softcap : f.scale * kLog2e;
  a.cap_mul = f.softcap * kLog2e;
  a.scale = f.scale;
  const int64_t off = f.seq_k - f.seq_q;
  int64_t dmax = INT64_MAX;
  if (f.causal) dmax = off;
  if (f.window_right >= 0 && off + f.window_right < dmax) dmax = off + f.window_right;
  a.dmax = clamp_to_int(dmax);
  a.dmin = f.window_left >= 0 ? clamp_to_int(off - f.window_left) : INT_MIN;
  a.q_vec = tiles::rows_16b_aligned(f.q, f.q_stride);
  a.k_vec = tiles::rows_16b_aligned(f.k, f.k_stride);
  a.v_vec = tiles::rows_16b_aligned(f.v, f.v_stride);
  a.do_vec = tiles::rows_16b_aligned(p.dout, p.dout_stride);
  a.dk_pair = tiles::rows_4b_aligned(p.dk, p.dk_stride);
  a.dv_pair = tiles::rows_4b_aligned(p.dv, p.dv_stride);

  cudaError_t err = cudaSuccess;
  const int64_t row_blocks_needed = (a.rows + kBwdRowWarps - 1) / kBwdRowWarps;
  const unsigned row_blocks = static_cast<unsigned>(row_blocks_needed < (1 << 20) ? row_blocks_needed : (1 << 20));
  if (a.rows > 0) {
    PYATTN_LAUNCH(bwd_prepare_kernel<T>, row_blocks, kBwdRowWarps * 32, 0, stream)(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  const bool split_kv_sums = a.splits > 1 && a.kv_rows > 0;
  if (split_kv_sums) {
    const size_t bytes = sizeof(float) * static_cast<size_t>(a.kv_rows * (f.head_dim + f.head_dim_v));
    if ((err = cudaMemsetAsync(a.dk_acc, 0, bytes, stream)) != cudaSuccess) return err;
  }
  if (a.n_ctas > 0) {
    const int smem = static_cast<int>(plan.smem_bytes);
    if constexpr (MmaTiles<kHeadDim>::kBwdTwoPass) {
      if ((err = launch_main<T, kHeadDim, kBwdOnlyDV>(a, smem, stream)) != cudaSuccess) return err;
      if ((err = launch_main<T, kHeadDim, kBwdOnlyDKDQ>(a, smem, stream)) != cudaSuccess) return err;
    } else {
      if ((err = launch_main<T, kHeadDim, kBwdBoth>(a, smem, stream)) != cudaSuccess) return err;
    }
  }
  if (a.rows > 0) {
    PYATTN_LAUNCH(bwd_convert_dq_kernel<T>, row_blocks, kBwdRowWarps * 32, 0, stream)(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (split_kv_sums) {
    const int64_t kv_blocks_needed = (a.kv_rows + kBwdRowWarps - 1) / kBwdRowWarps;
    const unsigned kv_blocks = static_cast<unsigned>(kv_blocks_needed < (1 << 20) ? kv_blocks_needed : (1 << 20));
    PYATTN_LAUNCH(bwd_convert_dkv_kernel<T>, kv_blocks, kBwdRowWarps * 32, 0, stream)(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

#define PYATTN_INSTANTIATE_BWD(T, D)                                                                   \
  template cudaError_t softmax_bwd_mma<T, D>(const SoftmaxBwdParams&, const LaunchPlan&, float*, \
                                             cudaStream_t);
PYATTN_INSTANTIATE_BWD(__half, 64)
PYATTN_INSTANTIATE_BWD(__half, 128)
PYATTN_INSTANTIATE_BWD(__half, 256)
PYATTN_INSTANTIATE_BWD(__nv_bfloat16, 64)
PYATTN_INSTANTIATE_BWD(__nv_bfloat16, 128)
PYATTN_INSTANTIATE_BWD(__nv_bfloat16, 256)
#undef PYATTN_INSTANTIATE_BWD

}  // namespace cuda
}  // namespace pyattn
