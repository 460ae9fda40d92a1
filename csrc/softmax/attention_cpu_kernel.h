// Block kernel of the CPU softmax attention forward, written once with GCC/Clang vector
// extensions and compiled once per instruction set (attention_cpu_<isa>.cpp defines
// PYATTN_ISA, PYATTN_VEC_BYTES, PYATTN_TILE_ROWS, PYATTN_TILE_VECS, then includes this).
//
// Everything here lives in a namespace named after the ISA and uses no standard-library
// templates: an inline function shared by TUs built with different -m flags could be
// merged by the linker into the AVX-512 copy and then run on a machine without it.
//
// Layout (FlashAttention-2 style online softmax, computed transposed so that every
// softmax statistic is a vector over queries and no horizontal reduction is needed):
//
//   QT [D ][BMp]  queries of the block, transposed, pre-scaled
//   ST [BN][BMp]  S^T = K_blk . QT  ->  P^T = exp2(S^T - m)   (one row per key)
//   OT [Dv][BMp]  O^T += V_blk^T . P^T, rescaled by exp2(m_old - m_new) per block
//
// Both products are C[M x BMp] += A[M x K] * B[K x BMp] with A read straight from the
// caller's k / v tensors through their strides (one scalar broadcast per element), so
// keys and values are never copied or transposed. Scores are kept in log2 units
// (scale * log2(e) folded into QT) so that exp2 is the only transcendental.

#include <cstdint>

#include "attention_cpu.h"

#if !defined(PYATTN_ISA) || !defined(PYATTN_VEC_BYTES) || !defined(PYATTN_TILE_ROWS) || \
    !defined(PYATTN_TILE_VECS)
#error "define PYATTN_ISA, PYATTN_VEC_BYTES, PYATTN_TILE_ROWS and PYATTN_TILE_VECS first"
#endif

namespace pyattn {
namespace cpu {
namespace PYATTN_ISA {

constexpr int kW = PYATTN_VEC_BYTES / 4;  // floats per vector
constexpr int kTileRows = PYATTN_TILE_ROWS;
constexpr int kTileVecs = PYATTN_TILE_VECS;
constexpr int kBlockRows = 64;  // queries per block (BM)
constexpr int kBlockKeys = 64;  // keys per block (BN)
static_assert(kBlockRows % kW == 0, "block rows must fill whole vectors");

// may_alias: vectors are loaded from and stored to float / int32 scratch arrays.
typedef float vf __attribute__((vector_size(PYATTN_VEC_BYTES), __may_alias__));
typedef int32_t vi __attribute__((vector_size(PYATTN_VEC_BYTES), __may_alias__));

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline vf splat(float x) { return x - vf{}; }  // x - (+0) == x exactly, unlike 0 + x
inline vi splat_i(int32_t x) { return x - vi{}; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline vf& at(float* p) { return *reinterpret_cast<vf*>(p); }  // 64-byte aligned scratch
inline const vf& at(const float* p) { return *reinterpret_cast<const vf*>(p); }

// 2^f - 1 on f in [-0.5, 0.5]: f * (c1 + c2 f + ... + c6 f^5), relative error of 2^f
// below 1e-7 (least-squares fit with minimax reweighting, float32 coefficients).
inline vf exp2m1_reduced(vf f) {
  vf q = splat(1.535334886284545e-4f);
  q = q * f + 1.3398875016719103e-3f;
  q = q * f + 9.618437848985195e-3f;
  q = q * f + 5.5503323674201965e-2f;
  q = q * f + 0.24022647738456726f;
  q = q * f + 0.6931471824645996f;
  return q * f;
}

// Splits x (already clamped to [-126, 126]) into n + f, n integer, |f| <= 0.5, and
// returns 2^n as a float built from its exponent bits.
inline vf split_exp2(vf x, vf* f) {
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = x + magic;
  const vf n = t - magic;
  *f = x - n;
  const vi n_int = (vi)t - (vi)magic;  // casts between vector types reinterpret the bits
  const vi pow_bits = (n_int + 127) << 23;
  return (vf)pow_bits;
}

// 2^x, exactly 0 for x < -126 (including -inf, the masked scores).
inline vf vexp2(vf x) {
  const vf lo = splat(-126.0f);
  vf xc = vmax(x, lo);
  xc = vmin(xc, splat(126.0f));
  vf f;
  const vf pow2n = split_exp2(xc, &f);
  const vf r = pow2n + pow2n * exp2m1_reduced(f);
  return x < lo ? vf{} : r;
}

// tanh(x) = e / (e + 2) with e = expm1(2x); expm1 keeps small |x| accurate to a few ulp.
inline vf vtanh(vf x) {
  vf y = x * (2.0f * kLog2e);
  y = vmin(vmax(y, splat(-126.0f)), splat(126.0f));
  vf f;
  const vf pow2n = split_exp2(y, &f);
  const vf e = pow2n * exp2m1_reduced(f) + (pow2n - 1.0f);
  return e / (e + 2.0f);
}

// C[MR x NV*W] (+)= sum_k A[r, k] * B[k, :], A[r, k] = a[r * a_row + k * a_k].
template <int MR, int NV, bool ACCUMULATE>
void gemm_tile(int64_t K, const float* __restrict a, int64_t a_row, int64_t a_k,
               const float* __restrict b, int64_t ldb, float* __restrict c, int64_t ldc) {
  vf acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = ACCUMULATE ? at(c + r * ldc + v * kW) : vf{};
  }
  const float* a_rows[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) a_rows[r] = a + r * a_row;
  for (int64_t k = 0; k < K; ++k) {
    vf bv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) bv[v] = at(b + k * ldb + v * kW);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const vf av = splat(a_rows[r][k * a_k]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) at(c + r * ldc + v * kW) = acc[r][v];
  }
}

using TileFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                        int64_t);

template <bool ACCUMULATE, int MR, int NV = kTileVecs>
TileFn tile_for_vecs(int nv) {
  if constexpr (NV == 1) {
    return &gemm_tile<MR, 1, ACCUMULATE>;
  } else {
    return nv == NV ? &gemm_tile<MR, NV, ACCUMULATE> : tile_for_vecs<ACCUMULATE, MR, NV - 1>(nv);
  }
}

template <bool ACCUMULATE, int MR = kTileRows>
TileFn tile_for(int mr, int nv) {
  if constexpr (MR == 1) {
    return tile_for_vecs<ACCUMULATE, 1>(nv);
  } else {
    return mr == MR ? tile_for_vecs<ACCUMULATE, MR>(nv) : tile_for<ACCUMULATE, MR - 1>(mr, nv);
  }
}

// C[M x n_vecs*W] (+)= A[M x K] * B[K x n_vecs*W] in register tiles.
template <bool ACCUMULATE>
void gemm(int64_t M, int n_vecs, int64_t K, const float* a, int64_t a_row, int64_t a_k,
          const float* b, int64_t ldb, float* c, int64_t ldc) {
  for (int v0 = 0; v0 < n_vecs; v0 += kTileVecs) {
    const int nv = static_cast<int>(min64(kTileVecs, n_vecs - v0));
    const TileFn full = tile_for<ACCUMULATE>(kTileRows, nv);
    int64_t r0 = 0;
    for (; r0 + kTileRows <= M; r0 += kTileRows) {
      full(K, a + r0 * a_row, a_row, a_k, b + v0 * kW, ldb, c + r0 * ldc + v0 * kW, ldc);
    }
    if (r0 < M) {
      tile_for<ACCUMULATE>(static_cast<int>(M - r0), nv)(K, a + r0 * a_row, a_row, a_k,
                                                         b + v0 * kW, ldb,
                                                         c + r0 * ldc + v0 * kW, ldc);
    }
  }
}

// Scratch regions, in floats, each a multiple of 16 floats (64 bytes).
struct Scratch {
  float *qt, *st, *ot, *m, *l;
  int32_t *lo_rel, *hi_rel;
  int64_t *lo, *hi;
};

inline size_t scratch_floats(int64_t head_dim, int64_t head_dim_v) {
  const int64_t r = kBlockRows;
  return static_cast<size_t>(round_up(head_dim * r, 16) + round_up(kBlockKeys * r, 16) +
                             round_up(head_dim_v * r, 16) + 4 * r + 4 * r);
}

inline Scratch carve(float* base, int64_t head_dim, int64_t head_dim_v) {
  const int64_t r = kBlockRows;
  Scratch s;
  s.qt = base;
  s.st = s.qt + round_up(head_dim * r, 16);
  s.ot = s.st + round_up(kBlockKeys * r, 16);
  s.m = s.ot + round_up(head_dim_v * r, 16);
  s.l = s.m + r;
  s.lo_rel = reinterpret_cast<int32_t*>(s.l + r);
  s.hi_rel = reinterpret_cast<int32_t*>(s.l + 2 * r);
  s.lo = reinterpret_cast<int64_t*>(s.l + 3 * r);
  s.hi = reinterpret_cast<int64_t*>(s.l + 5 * r);
  return s;
}

// One key block of the online softmax, on S^T rows [0, bn): optional softcap, optional
// mask, then P^T = exp2(S^T - m_new) in place, the running max / sum, and the rescale of
// the accumulated O^T columns.
template <bool SOFTCAP, bool MASK>
void softmax_block(float* st, int64_t ld, int64_t bn, int n_vecs, float cap_mul,
                   const int32_t* lo_rel, const int32_t* hi_rel, float* m, float* l, float* ot,
                   int64_t head_dim_v) {
  const vf neg_inf = splat(-__builtin_inff());
  for (int cv = 0; cv < n_vecs; ++cv) {
    float* col = st + cv * kW;
    vi lo{}, hi{};
    if (MASK) {
      lo = *reinterpret_cast<const vi*>(lo_rel + cv * kW);
      hi = *reinterpret_cast<const vi*>(hi_rel + cv * kW);
    }
    vf mx = neg_inf;
    for (int64_t j = 0; j < bn; ++j) {
      vf s = at(col + j * ld);
      if (SOFTCAP) s = vtanh(s) * cap_mul;
      if (MASK) {
        const vi jv = splat_i(static_cast<int32_t>(j));
        s = (lo <= jv) & (jv <= hi) ? s : neg_inf;
      }
      if (SOFTCAP || MASK) at(col + j * ld) = s;
      mx = vmax(mx, s);
    }
    const vf m_old = at(m + cv * kW);
    const vf m_new = vmax(m_old, mx);
    // A column that has seen no visible key yet keeps m = -inf; subtracting 0 instead
    // keeps exp2 at exactly 0 there rather than NaN from (-inf) - (-inf).
    const vf m_use = m_new == neg_inf ? vf{} : m_new;
    const vf alpha = vexp2(m_old - m_use);
    vf sum{};
    for (int64_t j = 0; j < bn; ++j) {
      const vf p = vexp2(at(col + j * ld) - m_use);
      at(col + j * ld) = p;
      sum += p;
    }
    at(l + cv * kW) = at(l + cv * kW) * alpha + sum;
    at(m + cv * kW) = m_new;
    for (int64_t d = 0; d < head_dim_v; ++d) at(ot + d * ld + cv * kW) *= alpha;
  }
}

using SoftmaxBlockFn = void (*)(float*, int64_t, int64_t, int, float, const int32_t*,
                                const int32_t*, float*, float*, float*, int64_t);

void run_block(const SoftmaxFwdParams& p, const BlockTask& t, float* scratch_base) {
  const int64_t D = p.head_dim, Dv = p.head_dim_v;
  const int64_t rows = t.n_heads * t.n_i;
  const int n_vecs = static_cast<int>((rows + kW - 1) / kW);
  const int64_t ld = static_cast<int64_t>(n_vecs) * kW;  // row length of QT / ST / OT
  Scratch s = carve(scratch_base, D, Dv);

  // Visible key range of every row, and of the block as a whole (empty rows excluded:
  // their output is written as zeros at the end whatever the loop computes for them).
  int64_t kmin = INT64_MAX, kmax = -1, max_lo = -1, min_hi = INT64_MAX;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = t.i_first + r % t.n_i;
    const int64_t lo = p.key_lo(i), hi = p.key_hi(i);
    s.lo[r] = lo;
    s.hi[r] = hi;
    if (lo > hi) continue;
    kmin = min64(kmin, lo);
    kmax = max64(kmax, hi);
    max_lo = max64(max_lo, lo);
    min_hi = min64(min_hi, hi);
  }

  const float* q = static_cast<const float*>(p.q);
  const float* k = static_cast<const float*>(p.k) + t.batch * p.k_stride[0] +
                   t.kv_head * p.k_stride[1];
  const float* v = static_cast<const float*>(p.v) + t.batch * p.v_stride[0] +
                   t.kv_head * p.v_stride[1];
  const bool softcap = p.softcap > 0.0f;

  if (kmax >= 0) {
    // QT = q^T * (scale * log2 e), or * scale / softcap before the tanh.
    const float q_mul = softcap ? p.scale / p.softcap : p.scale * kLog2e;
    for (int64_t r = 0; r < ld; ++r) {
      if (r < rows) {
        const int64_t h = t.h_first + r / t.n_i, i = t.i_first + r % t.n_i;
        const float* qr =
            q + t.batch * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2];
        for (int64_t d = 0; d < D; ++d) s.qt[d * ld + r] = qr[d * p.q_stride[3]] * q_mul;
      } else {
        for (int64_t d = 0; d < D; ++d) s.qt[d * ld + r] = 0.0f;
      }
    }
    for (int64_t r = 0; r < ld; ++r) {
      s.m[r] = -__builtin_inff();
      s.l[r] = 0.0f;
    }
    for (int64_t x = 0; x < Dv * ld; ++x) s.ot[x] = 0.0f;

    const float cap_mul = p.softcap * kLog2e;
    const SoftmaxBlockFn softmax_plain =
        softcap ? &softmax_block<true, false> : &softmax_block<false, false>;
    const SoftmaxBlockFn softmax_masked =
        softcap ? &softmax_block<true, true> : &softmax_block<false, true>;

    for (int64_t j0 = kmin; j0 <= kmax; j0 += kBlockKeys) {
      const int64_t bn = min64(kBlockKeys, kmax + 1 - j0);
      gemm<false>(bn, n_vecs, D, k + j0 * p.k_stride[2], p.k_stride[2], p.k_stride[3], s.qt, ld,
                  s.st, ld);
      const bool masked = max_lo > j0 || min_hi < j0 + bn - 1;
      if (masked) {
        // Row bounds relative to j0, clamped into [-1, bn] so they fit int32 lanes.
        for (int64_t r = 0; r < ld; ++r) {
          int64_t lo = 0, hi = -1;  // padding columns: nothing visible
          if (r < rows) {
            lo = s.lo[r] - j0;
            hi = s.hi[r] - j0;
          }
          s.lo_rel[r] = static_cast<int32_t>(min64(max64(lo, -1), bn));
          s.hi_rel[r] = static_cast<int32_t>(min64(max64(hi, -1), bn));
        }
      }
      (masked ? softmax_masked : softmax_plain)(s.st, ld, bn, n_vecs, cap_mul, s.lo_rel,
                                                s.hi_rel, s.m, s.l, s.ot, Dv);
      gemm<true>(Dv, n_vecs, bn, v + j0 * p.v_stride[2], p.v_stride[3], p.v_stride[2], s.st, ld,
                 s.ot, ld);
    }
  }

  float* out = static_cast<float*>(p.out);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = t.h_first + r / t.n_i, i = t.i_first + r % t.n_i;
    float* o = out + t.batch * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
    const bool visible = s.lo[r] <= s.hi[r] && kmax >= 0 && s.l[r] > 0.0f;
    const float inv_l = visible ? 1.0f / s.l[r] : 0.0f;
    for (int64_t d = 0; d < Dv; ++d) o[d * p.out_stride[3]] = visible ? s.ot[d * ld + r] * inv_l : 0.0f;
    if (p.lse != nullptr) {
      p.lse[t.batch * p.lse_stride[0] + h * p.lse_stride[1] + i * p.lse_stride[2]] =
          visible ? (s.m[r] + __builtin_log2f(s.l[r])) * kLn2 : -__builtin_inff();
    }
  }
}

size_t scratch_floats_fn(int64_t head_dim, int64_t head_dim_v) {
  return scratch_floats(head_dim, head_dim_v);
}

}  // namespace PYATTN_ISA
}  // namespace cpu
}  // namespace pyattn
