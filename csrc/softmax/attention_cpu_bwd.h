// Block kernels of the CPU softmax attention backward, compiled once per instruction set
// next to the forward (attention_cpu_<isa>.cpp includes this after attention_cpu_kernel.h).
//
// With S the final scores (after softcap and bias), P = exp(S - lse), the forward's output
// O = (P * Z) V (Z: dropout keep mask over 1 - p) and dlse the gradient of the lse:
//
//   dV = (P*Z)^T dO     dP = (dO V^T) * Z     dS = P * (dP - delta),  delta = rowsum(dO * O) - dlse
//   dbias = dS          dQ = scale * (dS * c') K     dK = scale * (dS * c')^T Q
//
// with c' = 1 - tanh^2 the softcap's derivative (1 without softcap). Unlike the forward
// these tiles are laid out naturally, queries in rows and keys in vector lanes: P needs
// no reduction over keys once lse is known, and the per-row lse and delta become splats.
//
// One task owns a run of key blocks of one (batch, kv head): for each block it packs
// K^T, V^T and K, then sweeps every query tile of the kv head's group that sees the block,
// accumulating dK, dV of the block in scratch and dQ / scale into the worker's own dq tiles
// (summed over workers at the end, so no two threads write one element). bwd_prepare packs
// q (times score_mul, as the forward does) and dout of each query tile into float32 rows
// once, with lse and delta, so the sweeps read only aligned float32 data.
//
// S must be the forward's scores to the last bit: P = exp(S - lse) then sums to 1 as the
// forward's did, and sum_j dS = 0 holds. With S rounded differently (K scaled instead of Q),
// keys sharing a large component lost dQ's cancellation of that component: dQ's error was
// 4 to 6 times a plain float32 backward's (1.3 to 2.4 times now). Both products sum over d
// in order with one FMA per term, so they agree wherever the forward took S^T = K . QT (not
// in the few-row path of decoding-sized blocks).

#include <cstdint>

#include "attention_cpu.h"
#include "attention_cpu_simd.h"

namespace pyattn {
namespace cpu {
namespace PYATTN_ISA {

constexpr int kBwdRows = 64;  // queries per tile (BM)
constexpr int kBwdKeys = 64;  // keys per block (BN), a multiple of every kW
static_assert(kBwdKeys % kW == 0, "key blocks must fill whole vectors");

struct BwdScratch {
  float *kt, *vt, *kn, *s, *dp, *dc, *dk, *dv;
};

inline BwdScratch carve_bwd(float* base, const SoftmaxFwdParams& p, const BwdWorkspace& ws) {
  const int64_t bn = kBwdKeys, bm = kBwdRows;
  BwdScratch s;
  s.kt = base;                                    // [D][BN]   K^T
  s.vt = s.kt + round_up(p.head_dim * bn, 16);    // [Dv][BN]  V^T
  s.kn = s.vt + round_up(p.head_dim_v * bn, 16);  // [BN][dp]  K
  s.s = s.kn + bn * ws.dp;                        // [BM][BN]  S -> P (times Z)
  s.dp = s.s + bm * bn;                           // [BM][BN]  dP -> dS * c'
  s.dc = s.dp + bm * bn;                          // [BM][BN]  softcap derivative c'
  s.dk = s.dc + bm * bn;                          // [BN][dp]  dK * q_mul / scale of the block
  s.dv = s.dk + bn * ws.dp;                       // [BN][dvp] dV of the block
  return s;
}

size_t bwd_scratch_floats(const SoftmaxFwdParams& p, const BwdWorkspace& ws) {
  const BwdScratch s = carve_bwd(nullptr, p, ws);
  return static_cast<size_t>(s.dv - s.kt) + kBwdKeys * ws.dvp;
}

inline int64_t tile_index(const SoftmaxFwdParams& p, const BwdWorkspace& ws, int64_t b, int64_t h,
                          int64_t qb) {
  return ws.tile_base[b] * p.heads_q + h * (ws.tile_base[b + 1] - ws.tile_base[b]) + qb;
}

void bwd_prepare(const SoftmaxBwdParams& bp, const BwdWorkspace& ws, int64_t b, int64_t h,
                 int64_t qb) {
  const SoftmaxFwdParams& p = bp.fwd;
  const int64_t bm = kBwdRows, i0 = qb * bm, n = min64(bm, p.seq_q - i0);
  const int64_t tile = tile_index(p, ws, b, h, qb);
  float* qn = ws.qn + tile * bm * ws.dp;
  float* don = ws.don + tile * bm * ws.dvp;
  float* lse2 = ws.lse2 + tile * bm;
  float* delta = ws.delta + tile * bm;
  pack_rows(p.dtype, qn, ws.dp, offset(p.q, p.dtype, row_offset(p.q_stride, b, h, i0)), n,
            p.q_stride[2], p.head_dim, p.q_stride[3], score_mul(p));
  pack_rows(p.dtype, don, ws.dvp, offset(bp.dout, p.dtype, row_offset(bp.dout_stride, b, h, i0)), n,
            bp.dout_stride[2], p.head_dim_v, bp.dout_stride[3], 1.0f);
  for (int64_t x = n * ws.dp; x < bm * ws.dp; ++x) qn[x] = 0.0f;
  for (int64_t x = n * ws.dvp; x < bm * ws.dvp; ++x) don[x] = 0.0f;
  const void* out = offset(p.out, p.dtype, row_offset(p.out_stride, b, h, i0));
  for (int64_t r = 0; r < bm; ++r) {
    if (r >= n) {
      lse2[r] = kInf;
      delta[r] = 0.0f;
      continue;
    }
    const float lse = p.lse[row_offset(p.lse_stride, b, h, i0 + r)];
    // A row with lse = -inf saw no key: +inf makes its P exactly 0.
    lse2[r] = lse == -kInf ? kInf : lse * kLog2e;
    float dot = 0.0f;
    alignas(64) float o[64];
    for (int64_t d0 = 0; d0 < p.head_dim_v; d0 += 64) {
      const int64_t m = min64(64, p.head_dim_v - d0);
      const void* o_row = offset(out, p.dtype, r * p.out_stride[2] + d0 * p.out_stride[3]);
      pack_rows(p.dtype, o, 64, o_row, 1, 0, m, p.out_stride[3], 1.0f);
      for (int64_t d = 0; d < m; ++d) dot += don[r * ws.dvp + d0 + d] * o[d];
    }
    const float* dlse = bp.dlse;
    const float dl = dlse == nullptr ? 0.0f : dlse[row_offset(bp.dlse_stride, b, h, i0 + r)];
    delta[r] = dot - dl;
  }
}

// One (query tile, key block) pair after S = (Q * score_mul) K^T and dP = dO V^T: turns S into
// P (times Z) and dP into dS * c' in place, writing dbias on the way. SOFTCAP: the tanh is
// applied here; otherwise a softcap (if any) was applied before the bias and dc holds c'.
struct BwdTile {
  const SoftmaxBwdParams* bp;
  int64_t b, h, i0, n, j0, bn;
  int nvj;  // vectors of keys
  const float* lse2;
  const float* delta;
  float *s, *dp;
  const float* dc;  // c' when the softcap was applied before the bias, else null
  float cap_mul;
};

template <bool SOFTCAP, bool MASK>
void bwd_tile_elementwise(const BwdTile& t) {
  const SoftmaxFwdParams& p = t.bp->fwd;
  const bool dropout = p.dropout_p > 0.0f;
  float* dbias = t.bp->dbias;
  const vi lanes = iota_i();
  for (int64_t r = 0; r < t.n; ++r) {
    const int64_t i = t.i0 + r;
    const vf lse2 = splat(t.lse2[r]), delta = splat(t.delta[r]);
    vi lo{}, hi{};
    if (MASK) {
      lo = splat_i(static_cast<int32_t>(min64(max64(p.key_lo(i) - t.j0, -1), kBwdKeys)));
      hi = splat_i(static_cast<int32_t>(min64(max64(p.key_hi(i) - t.j0, -1), kBwdKeys)));
    }
    uint64_t counter = 0;
    if (dropout) {
      const int64_t row = row_offset(p.dropout_stride, t.b, t.h, i);
      counter = static_cast<uint64_t>(p.dropout_offset + row + t.j0);
    }
    float* dbias_row = nullptr;
    if (dbias != nullptr) {
      const int64_t* ds = t.bp->dbias_stride;
      dbias_row = dbias + row_offset(ds, t.b, t.h, i) + t.j0 * ds[3];
    }
    for (int jv = 0; jv < t.nvj; ++jv) {
      const int64_t x = r * kBwdKeys + jv * kW;
      vf s = at(t.s + x);
      vf dc{};
      if (SOFTCAP) {
        const vf th = vtanh(s);
        dc = 1.0f - th * th;
        s = th * t.cap_mul;
      } else if (t.dc != nullptr) {
        dc = at(t.dc + x);
      }
      if (MASK) {
        const vi j = lanes + jv * kW;
        s = (lo <= j) & (j <= hi) ? s : splat(-kInf);
      }
      const vf prob = vexp2(s - lse2);  // s <= lse up to rounding
      vf dpv = at(t.dp + x);
      vf kept = prob;
      if (dropout) {
        const uint64_t c = counter + static_cast<uint64_t>(jv * kW);
        vu c_lo = splat_u(static_cast<uint32_t>(c)), c_hi = splat_u(static_cast<uint32_t>(c >> 32));
        counter_add(&c_lo, &c_hi, (vu)lanes);
        const vf z = dropout_multiplier(p, c_lo, c_hi);
        dpv *= z;
        kept *= z;
      }
      vf ds = prob * (dpv - delta);
      if (dbias_row != nullptr) {
        const int64_t m = min64(kW, t.bn - jv * kW);
        for (int64_t l = 0; l < m; ++l) dbias_row[(jv * kW + l) * t.bp->dbias_stride[3]] = ds[l];
      }
      if (SOFTCAP || t.dc != nullptr) ds *= dc;
      at(t.s + x) = kept;
      at(t.dp + x) = ds;
    }
  }
}

using BwdElementwiseFn = void (*)(const BwdTile&);

// First query row that sees a key >= j (key_hi is non-decreasing in i); seq_q if none.
inline int64_t first_row_seeing_from(const SoftmaxFwdParams& p, int64_t j) {
  int64_t lo = 0, hi = p.seq_q;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (p.key_hi(mid) >= j) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// One past the last query row that sees a key <= j (key_lo is non-decreasing in i).
inline int64_t end_row_seeing_to(const SoftmaxFwdParams& p, int64_t j) {
  int64_t lo = 0, hi = p.seq_q;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (p.key_lo(mid) <= j) lo = mid + 1; else hi = mid;
  }
  return lo;
}

void bwd_key_blocks(const SoftmaxBwdParams& bp, const BwdWorkspace& ws, int64_t b, int64_t kvh,
                    int64_t kb_begin, int64_t kb_end, float* dq_worker, float* scratch) {
  const SoftmaxFwdParams& p = bp.fwd;
  const int64_t D = p.head_dim, Dv = p.head_dim_v, dp = ws.dp, dvp = ws.dvp;
  const int64_t BN = kBwdKeys, BM = kBwdRows;
  const int64_t group = p.heads_q / p.heads_kv;
  const BwdScratch s = carve_bwd(scratch, p, ws);
  const bool softcap = p.softcap > 0.0f;
  const bool bias = p.bias_kind != SoftmaxFwdParams::kBiasNone;
  const float q_mul = score_mul(p);
  const void* k = offset(p.k, p.dtype, b * p.k_stride[0] + kvh * p.k_stride[1]);
  const void* v = offset(p.v, p.dtype, b * p.v_stride[0] + kvh * p.v_stride[1]);
  const BwdElementwiseFn plain = softcap && !bias ? &bwd_tile_elementwise<true, false>
                                                  : &bwd_tile_elementwise<false, false>;
  const BwdElementwiseFn masked = softcap && !bias ? &bwd_tile_elementwise<true, true>
                                                   : &bwd_tile_elementwise<false, true>;

  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t j0 = kb * BN, bn = min64(BN, p.seq_k - j0);
    const int nvj = static_cast<int>((bn + kW - 1) / kW);
    const void* kb_ptr = offset(k, p.dtype, j0 * p.k_stride[2]);
    pack_cols(p.dtype, s.kt, BN, kb_ptr, bn, p.k_stride[2], D, p.k_stride[3], 1.0f);
    pack_cols(p.dtype, s.vt, BN, offset(v, p.dtype, j0 * p.v_stride[2]), bn, p.v_stride[2], Dv,
              p.v_stride[3], 1.0f);
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t j = bn; j < BN; ++j) s.kt[d * BN + j] = 0.0f;
    }
    for (int64_t d = 0; d < Dv; ++d) {
      for (int64_t j = bn; j < BN; ++j) s.vt[d * BN + j] = 0.0f;
    }
    pack_rows(p.dtype, s.kn, dp, kb_ptr, bn, p.k_stride[2], D, p.k_stride[3], 1.0f);
    for (int64_t x = 0; x < bn * dp; ++x) s.dk[x] = 0.0f;
    for (int64_t x = 0; x < bn * dvp; ++x) s.dv[x] = 0.0f;

    // The query rows that see any key of the block form one interval.
    const int64_t i_begin = first_row_seeing_from(p, j0);
    const int64_t i_end = end_row_seeing_to(p, j0 + bn - 1);
    for (int64_t g = 0; g < group && i_begin < i_end; ++g) {
      const int64_t h = kvh * group + g;
      for (int64_t qb = i_begin / BM; qb * BM < i_end; ++qb) {
        const int64_t i0 = qb * BM, n = min64(BM, p.seq_q - i0);
        const int64_t tile = tile_index(p, ws, b, h, qb);
        const float* qn = ws.qn + tile * BM * dp;
        const float* don = ws.don + tile * BM * dvp;
        float* dq = dq_worker + tile * BM * dp;

        gemm<false>(n, nvj, D, qn, dp, 1, s.kt, BN, s.s, BN);     // S = (Q * q_mul) K^T
        gemm<false>(n, nvj, Dv, don, dvp, 1, s.vt, BN, s.dp, BN);  // dP = dO V^T
        BwdTile t{&bp, b, h, i0, n, j0, bn, nvj, ws.lse2 + tile * BM, ws.delta + tile * BM,
                  s.s, s.dp, nullptr, p.softcap * kLog2e};
        if (bias) {
          if (softcap) {
            softcap_tile(s.s, BN, n, nvj, t.cap_mul, s.dc);
            t.dc = s.dc;
          }
          apply_bias(p, b, h, i0, n, n, j0, bn, s.s, BN, 1);
        }
        const bool partial = p.key_lo(i0 + n - 1) > j0 || p.key_hi(i0) < j0 + bn - 1;
        (partial ? masked : plain)(t);

        const int dvp_vecs = static_cast<int>(dvp / kW), dp_vecs = static_cast<int>(dp / kW);
        gemm<true>(bn, dvp_vecs, n, s.s, 1, BN, don, dvp, s.dv, dvp);  // dV += P^T dO
        gemm<true>(bn, dp_vecs, n, s.dp, 1, BN, qn, dp, s.dk, dp);     // dK += dS^T Q * q_mul
        gemm<true>(n, dp_vecs, bn, s.dp, BN, 1, s.kn, dp, dq, dp);     // dQ += dS K
      }
    }
    void* dk = offset(bp.dk, p.dtype, row_offset(bp.dk_stride, b, kvh, j0));
    void* dv = offset(bp.dv, p.dtype, row_offset(bp.dv_stride, b, kvh, j0));
    store_rows(p.dtype, dk, bp.dk_stride[2], bp.dk_stride[3], s.dk, dp, bn, D, p.scale / q_mul);
    store_rows(p.dtype, dv, bp.dv_stride[2], bp.dv_stride[3], s.dv, dvp, bn, Dv, 1.0f);
  }
}

void bwd_finish(const SoftmaxBwdParams& bp, const BwdWorkspace& ws, int64_t b, int64_t h,
                int64_t qb, const float* const* parts, int n_parts) {
  const SoftmaxFwdParams& p = bp.fwd;
  const int64_t BM = kBwdRows, dp = ws.dp;
  const int64_t i0 = qb * BM, n = min64(BM, p.seq_q - i0);
  const int64_t tile_off = tile_index(p, ws, b, h, qb) * BM * dp;
  alignas(64) float sum[kBwdRows * 16];  // one row group at a time when dp > 16
  void* dq = offset(bp.dq, p.dtype, row_offset(bp.dq_stride, b, h, i0));
  for (int64_t d0 = 0; d0 < dp; d0 += 16) {
    for (int64_t x = 0; x < n * 16; ++x) sum[x] = 0.0f;
    for (int w = 0; w < n_parts; ++w) {
      const float* part = parts[w] + tile_off + d0;
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t d = 0; d < 16; ++d) sum[r * 16 + d] += part[r * dp + d];
      }
    }
    store_rows(p.dtype, offset(dq, p.dtype, d0 * bp.dq_stride[3]), bp.dq_stride[2], bp.dq_stride[3],
               sum, 16, n, min64(16, p.head_dim - d0), p.scale);
  }
}

}  // namespace PYATTN_ISA

#define PYATTN_CONCAT_(a, b) a##b
#define PYATTN_CONCAT(a, b) PYATTN_CONCAT_(a, b)
#define PYATTN_STRING_(x) #x
#define PYATTN_STRING(x) PYATTN_STRING_(x)

// softmax_kernel_<isa>(): the table of this TU's kernels.
const IsaKernel& PYATTN_CONCAT(softmax_kernel_, PYATTN_ISA)() {
  using namespace PYATTN_ISA;
  static constexpr IsaKernel kernel{
      PYATTN_STRING(PYATTN_ISA), kBlockRows, &scratch_floats_fn, &run_block, &merge_splits,
      kBwdRows, kBwdKeys, &bwd_scratch_floats, &bwd_prepare, &bwd_key_blocks, &bwd_finish};
  return kernel;
}

}  // namespace cpu
}  // namespace pyattn
