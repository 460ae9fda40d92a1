// Block kernel of the CPU softmax attention forward, written once with GCC/Clang vector
// extensions and compiled once per instruction set (attention_cpu_<isa>.cpp defines
// PYATTN_ISA, PYATTN_VEC_BYTES, PYATTN_TILE_ROWS, PYATTN_TILE_VECS and optionally
// PYATTN_BLOCK_KEYS, then includes this).
//
// Layout (FlashAttention-2 style online softmax; the scores are computed transposed so that
// every softmax statistic is a vector over queries and no horizontal reduction is needed):
//
//   QT [D  ][BMp]  queries of the block, transposed, pre-scaled, float32
//   ST [BN ][BMp]  S^T = K_blk . QT  ->  P^T = exp2(S^T - m)   (one row per key)
//   SP [BN * R]    few rows (R <= kW / 2), no mask: S^T packed, kW / R keys per vector
//   O  [BMp][Dvp]  O += P . V_blk, each row rescaled by exp2(m_old - m_new) per block
//
// S^T = K_blk . QT broadcasts the elements of the caller's float32 k through its strides
// (blocks of at most half a vector of query rows, as in decoding, take dot products of k's
// rows with a row-major copy of the queries instead: scores_few_rows);
// O += P . V_blk broadcasts P (read down the columns of P^T) and takes whole vectors of
// v's rows, so keys and values are never copied or transposed when v's rows are contiguous
// and a whole number of vectors long (else, and for float16 / bfloat16, a key or value
// block is first written into a small float32 buffer). Reading v by rows rather than by
// columns is what makes decoding (a few query rows over many keys) stream v at vector
// width. Scores are kept in log2 units (scale * log2(e) folded into QT) so that exp2 is
// the only transcendental.
//
// Per key block: S^T, softcap, attn_bias, causal / window mask, online softmax, dropout
// of P^T (the row sums l take P before dropout, as the lse does), O update. Unmasked blocks
// without softcap or bias (most of them) take the softmax inside the S^T product instead
// (ExpEpilogue).

#include <cstdint>

#include "attention_cpu.h"
#include "attention_cpu_simd.h"

namespace pyattn {
namespace cpu {
namespace PYATTN_ISA {

#ifndef PYATTN_BLOCK_KEYS
#define PYATTN_BLOCK_KEYS 64
#endif

constexpr int kBlockRows = 64;                 // queries per block (BM)
constexpr int kBlockKeys = PYATTN_BLOCK_KEYS;  // keys per block (BN)
static_assert(kBlockRows % kW == 0, "block rows must fill whole vectors");

// The factor the queries are multiplied by before S = Q K^T: scale * log2 e (scores in log2
// units), or scale / softcap ahead of the tanh. The backward multiplies q by it exactly as
// the forward does, so that both compute bit-identical scores (see attention_cpu_bwd.h).
inline float score_mul(const SoftmaxFwdParams& p) {
  return p.softcap > 0.0f ? p.scale / p.softcap : p.scale * kLog2e;
}

// Scratch regions, in floats, each a multiple of 16 floats (64 bytes).
struct Scratch {
  float *qt, *qr, *st, *o, *m, *l, *alpha, *m_ref, *bsum, *bmax, *kbuf, *vbuf;
  int32_t *lo_rel, *hi_rel;
  int64_t *lo, *hi;
  uint32_t *drop_lo, *drop_hi;  // dropout counter of each row at key 0
};

// Row length of O and of a float32 value block: Dv padded to whole vectors; of the row-major
// queries and a float32 key block for scores_few_rows: D padded likewise.
inline int64_t padded_dv(const SoftmaxFwdParams& p) { return round_up(p.head_dim_v, kW); }
inline int64_t padded_d(const SoftmaxFwdParams& p) { return round_up(p.head_dim, kW); }

// Whether a key block's rows can be read in place as whole vectors (scores_few_rows).
inline bool k_rows_in_place(const SoftmaxFwdParams& p) {
  return p.dtype == kFloat32 && p.k_stride[3] == 1 && p.head_dim % kW == 0;
}

// R for scores_few_rows: the block's query rows rounded up to a power of two, when that is
// at most half a vector (else 0: the transposed product fills at least half of each vector).
inline int few_rows(int64_t rows) {
  int r = 1;
  while (r < rows) r *= 2;
  return r <= kW / 2 ? r : 0;
}

// Whether V_blk can be read in place: float32 rows of contiguous elements, whole vectors long.
inline bool v_in_place(const SoftmaxFwdParams& p) {
  return p.dtype == kFloat32 && p.v_stride[3] == 1 && p.head_dim_v % kW == 0;
}

inline size_t scratch_floats(const SoftmaxFwdParams& p) {
  const int64_t r = kBlockRows, D = p.head_dim, dp = padded_d(p), dvp = padded_dv(p);
  // float32 copies of a key block (rows dp long) and a value block (when not read in place)
  const int64_t kbuf = round_up(kBlockKeys * dp, 16);
  const int64_t vbuf = v_in_place(p) ? 0 : round_up(kBlockKeys * dvp, 16);
  return static_cast<size_t>(round_up(D * r, 16) + round_up(kW * dp, 16) +
                             round_up(kBlockKeys * r, 16) + round_up(r * dvp, 16) + 3 * r + 6 * r +
                             5 * r + kbuf + vbuf);
}

inline Scratch carve(float* base, const SoftmaxFwdParams& p) {
  const int64_t r = kBlockRows, D = p.head_dim;
  Scratch s;
  s.qt = base;
  s.qr = s.qt + round_up(D * r, 16);
  s.st = s.qr + round_up(kW * padded_d(p), 16);
  s.o = s.st + round_up(kBlockKeys * r, 16);
  s.m = s.o + round_up(r * padded_dv(p), 16);
  s.l = s.m + r;
  s.alpha = s.l + r;
  s.lo_rel = reinterpret_cast<int32_t*>(s.alpha + r);
  s.hi_rel = reinterpret_cast<int32_t*>(s.alpha + 2 * r);
  s.lo = reinterpret_cast<int64_t*>(s.alpha + 3 * r);
  s.hi = reinterpret_cast<int64_t*>(s.alpha + 5 * r);
  s.drop_lo = reinterpret_cast<uint32_t*>(s.alpha + 7 * r);
  s.drop_hi = reinterpret_cast<uint32_t*>(s.alpha + 8 * r);
  s.m_ref = s.alpha + 9 * r;
  s.bsum = s.alpha + 10 * r;
  s.bmax = s.alpha + 11 * r;
  s.kbuf = s.alpha + 12 * r;
  s.vbuf = s.kbuf + round_up(kBlockKeys * padded_d(p), 16);
  return s;
}

// The maximum the scores of a column are measured from: m, or 0 where m = -inf (a column
// that has seen no visible key yet), which keeps exp2 of its masked scores at exactly 0
// rather than NaN from (-inf) - (-inf).
inline vf reference_max(vf m) { return m == splat(-kInf) ? vf{} : m; }

// The vectors x[i * stride], i < n (64-byte aligned), replaced by exp2(x - m); returns their sum.
inline vf exp2_in_place(float* x, int64_t n, int64_t stride, vf m) {
  vf sum{};
  for (int64_t i = 0; i < n; ++i) {
    const vf p = vexp2(at(x + i * stride) - m);
    at(x + i * stride) = p;
    sum += p;
  }
  return sum;
}

// One key block of the online softmax, on S^T rows [0, bn): optional softcap, optional
// mask, then P^T = exp2(S^T - m_new) in place, the running max / sum, and per query the
// factor alpha = exp2(m_old - m_new) its accumulated output row must be scaled by. Returns
// whether any running max changed (else every alpha is 1).
template <bool SOFTCAP, bool MASK>
bool softmax_block(float* st, int64_t ld, int64_t bn, int n_vecs, float cap_mul,
                   const int32_t* lo_rel, const int32_t* hi_rel, float* m, float* l,
                   float* alpha_out) {
  bool changed = false;
  const vf neg_inf = splat(-kInf);
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
    const vf m_use = reference_max(m_new);
    const vf alpha = vexp2(m_old - m_use);
    const vf sum = exp2_in_place(col, bn, ld, m_use);
    at(l + cv * kW) = at(l + cv * kW) * alpha + sum;
    at(m + cv * kW) = m_new;
    at(alpha_out + cv * kW) = alpha;
    changed |= any_lane(m_new != m_old);
  }
  return changed;
}

using SoftmaxBlockFn = bool (*)(float*, int64_t, int64_t, int, float, const int32_t*,
                                const int32_t*, float*, float*, float*);

// The online softmax of an unmasked key block fused into its S^T = K . QT product, while
// the scores are still in registers: each score s of query column c becomes
// P^T = exp2(s - m_ref[c]) against the running maximum so far, and the columns' sums of P^T
// and maxima of S^T gather in sum / mx. settle_exp_block then keeps m_ref unless a column's
// new maximum exceeds it by more than kStaleMax (P^T stays below 2^kStaleMax, as in
// FlashAttention-4's conditional rescaling), which saves the two passes over S^T.
struct ExpEpilogue {
  const float* m_ref;
  float* sum;
  float* mx;
  ExpEpilogue at_column(int v0) const { return {m_ref + v0 * kW, sum + v0 * kW, mx + v0 * kW}; }
  template <int MR, int NV>
  void operator()(vf (&acc)[MR][NV]) const {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const vf m = at(m_ref + v * kW);
      vf s = at(sum + v * kW), x = at(mx + v * kW);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        x = vmax(x, acc[r][v]);
        acc[r][v] = vexp2(acc[r][v] - m);
        s += acc[r][v];
      }
      at(sum + v * kW) = s;
      at(mx + v * kW) = x;
    }
  }
};

constexpr float kStaleMax = 8.0f;  // log2 units
// Beyond this distance between a column's new maximum and m_ref, P^T may have overflowed
// or underflowed: the block is recomputed unfused.
constexpr float kRefitMax = 100.0f;

// Before the fused product: m_ref = reference_max(m), sums 0 and
// maxima -inf.
inline void start_exp_block(int n_vecs, const float* m, float* m_ref, float* sum, float* mx) {
  for (int cv = 0; cv < n_vecs; ++cv) {
    at(m_ref + cv * kW) = reference_max(at(m + cv * kW));
    at(sum + cv * kW) = vf{};
    at(mx + cv * kW) = splat(-kInf);
  }
}

// Which lanes of column vector cv must leave m_ref after the fused product: those whose
// block maximum exceeds it by more than kStaleMax, and those that had seen no key (m_ref 0
// stood in for their -inf).
inline vi exp_block_moves(const float* m, const float* m_ref, const float* mx, int cv) {
  return (at(mx + cv * kW) > at(m_ref + cv * kW) + kStaleMax) | (at(m + cv * kW) == splat(-kInf));
}

// After the fused product: the new maxima m_new (the block's maximum in the lanes that
// move, else m_ref), P^T scaled by exp2(m_ref - m_new) in the columns that moved, l and
// alpha = exp2(m_old - m_new) as softmax_block leaves them; returns whether any m changed.
// Returns false in *ok, changing nothing, when a lane would move by more than kRefitMax
// (its P^T may have overflowed or lost its digits): the caller then redoes the block unfused.
inline bool settle_exp_block(float* st, int64_t ld, int64_t bn, int n_vecs, const float* m_ref,
                             const float* sum, const float* mx, float* m, float* l, float* alpha,
                             bool* ok) {
  for (int cv = 0; cv < n_vecs; ++cv) {
    const vf d = at(mx + cv * kW) - at(m_ref + cv * kW);
    *ok = !any_lane(exp_block_moves(m, m_ref, mx, cv) & ((d > kRefitMax) | (d < -kRefitMax)));
    if (!*ok) return false;
  }
  bool changed = false;
  for (int cv = 0; cv < n_vecs; ++cv) {
    const vi move = exp_block_moves(m, m_ref, mx, cv);
    if (!any_lane(move)) {
      at(l + cv * kW) += at(sum + cv * kW);
      at(alpha + cv * kW) = splat(1.0f);
      continue;
    }
    const vf m_old = at(m + cv * kW), ref = at(m_ref + cv * kW);
    const vf m_new = move ? at(mx + cv * kW) : ref;
    const vf factor = vexp2(ref - m_new);
    for (int64_t j = 0; j < bn; ++j) at(st + j * ld + cv * kW) *= factor;
    const vf a = vexp2(m_old - m_new);
    at(l + cv * kW) = at(l + cv * kW) * a + at(sum + cv * kW) * factor;
    at(m + cv * kW) = m_new;
    at(alpha + cv * kW) = a;
    changed = true;
  }
  return changed;
}

// softmax_block for blocks of R <= kW / 2 query rows without mask, softcap, bias or dropout,
// on the packed scores sp[j * R + r] of keys j < bn (scores_few_rows with ld = R): lane l of
// every vector holds row l % R, so exp2 runs on whole vectors (the S^T layout would use R of
// each vector's kW lanes: 1 of 8 when decoding without GQA on AVX2). sp is 64-byte aligned,
// with room for bn * R rounded up to whole vectors.
template <int R>
bool softmax_block_few(float* sp, int64_t bn, float* m, float* l, float* alpha_out) {
  const int64_t n = bn * R, n_vecs = (n + kW - 1) / kW;
  for (int64_t x = n; x < n_vecs * kW; ++x) sp[x] = -kInf;  // lanes past the last key
  const vf neg_inf = splat(-kInf);
  vf mx = neg_inf;
  for (int64_t i = 0; i < n_vecs; ++i) mx = vmax(mx, at(sp + i * kW));
  mx = fold_rows<R, true>(mx);
  vf m_old;
  for (int lane = 0; lane < kW; ++lane) m_old[lane] = m[lane % R];
  const vf m_new = vmax(m_old, mx);
  const vf m_use = reference_max(m_new);
  const vf alpha = vexp2(m_old - m_use);
  const vf sum = fold_rows<R, false>(exp2_in_place(sp, n_vecs, kW, m_use));
  bool changed = false;
  for (int r = 0; r < R; ++r) {
    l[r] = l[r] * alpha[r] + sum[r];
    changed |= m_new[r] != m[r];
    m[r] = m_new[r];
    alpha_out[r] = alpha[r];
  }
  return changed;
}

// The few-row functions for R query rows, R from few_rows.
struct FewRowFns {
  void (*scores)(int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t);
  bool (*softmax)(float*, int64_t, float*, float*, float*);
};

template <int R>
FewRowFns few_row_fns_for() {
  return {&scores_few_rows<R>, &softmax_block_few<R>};
}

inline FewRowFns few_row_fns(int r) {
  if constexpr (kW >= 16) {
    if (r == 8) return few_row_fns_for<8>();
  }
  if constexpr (kW >= 8) {
    if (r == 4) return few_row_fns_for<4>();
  }
  return r == 2 ? few_row_fns_for<2>() : few_row_fns_for<1>();
}

// Rows [0, rows) of O (row length dvp) times their alpha.
inline void rescale_rows(float* o, int64_t dvp, int64_t rows, const float* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    // Once the running maxima settle, most rows keep theirs: skip those.
    if (alpha[r] == 1.0f) continue;
    const vf a = splat(alpha[r]);
    for (int64_t d = 0; d < dvp; d += kW) at(o + r * dvp + d) *= a;
  }
}

// P^T of keys [j0, j0 + bn) times the dropout multipliers of their (row, key) counters.
inline void dropout_tile(const SoftmaxFwdParams& p, const Scratch& s, int64_t j0, int64_t bn,
                         int n_vecs, int64_t ld) {
  for (int cv = 0; cv < n_vecs; ++cv) {
    const vu lo = *reinterpret_cast<const vu*>(s.drop_lo + cv * kW);
    const vu hi = *reinterpret_cast<const vu*>(s.drop_hi + cv * kW);
    for (int64_t j = 0; j < bn; ++j) {
      vu c_lo = lo, c_hi = hi;
      counter_add(&c_lo, &c_hi, splat_u(static_cast<uint32_t>(j0 + j)));
      at(s.st + j * ld + cv * kW) *= dropout_multiplier(p, c_lo, c_hi);
    }
  }
}

void run_block(const SoftmaxFwdParams& p, const BlockTask& t, float* scratch_base) {
  const int64_t D = p.head_dim, Dv = p.head_dim_v, dp = padded_d(p), dvp = padded_dv(p);
  const int64_t rows = t.n_heads * t.n_i;
  const int n_vecs = static_cast<int>((rows + kW - 1) / kW);
  const int64_t ld = static_cast<int64_t>(n_vecs) * kW;  // row length of QT / ST
  Scratch s = carve(scratch_base, p);

  // Visible key range of every row (within the task's keys), and of the block as a whole
  // (empty rows excluded: their output is written as zeros at the end whatever the loop
  // computes for them).
  int64_t kmin = INT64_MAX, kmax = -1, max_lo = -1, min_hi = INT64_MAX;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = t.i_first + r % t.n_i;
    const int64_t lo = max64(p.key_lo(i), t.key_begin), hi = min64(p.key_hi(i), t.key_end - 1);
    s.lo[r] = lo;
    s.hi[r] = hi;
    if (lo > hi) continue;
    kmin = min64(kmin, lo);
    kmax = max64(kmax, hi);
    max_lo = max64(max_lo, lo);
    min_hi = min64(min_hi, hi);
  }

  const int few = few_rows(rows);
  // k and v are read in place, or a block at a time through a float32 copy (k: rows dp long)
  const bool k_native = few > 0 ? k_rows_in_place(p) : p.dtype == kFloat32;
  const bool v_native = v_in_place(p);
  const void* k = offset(p.k, p.dtype, t.batch * p.k_stride[0] + t.kv_head * p.k_stride[1]);
  const void* v = offset(p.v, p.dtype, t.batch * p.v_stride[0] + t.kv_head * p.v_stride[1]);
  const bool softcap = p.softcap > 0.0f;
  const bool bias = p.bias_kind != SoftmaxFwdParams::kBiasNone;
  const bool dropout = p.dropout_p > 0.0f;

  if (kmax >= 0) {
    // QT = q^T * (scale * log2 e), or * scale / softcap before the tanh.
    const float q_mul = score_mul(p);
    // For few rows, Qr instead: rows dp long, zero past D, and zero rows up to R.
    for (int64_t h = t.h_first; h < t.h_first + t.n_heads; ++h) {
      const int64_t r0 = (h - t.h_first) * t.n_i;
      const void* q = offset(p.q, p.dtype, row_offset(p.q_stride, t.batch, h, t.i_first));
      if (few > 0) {
        pack_rows(p.dtype, s.qr + r0 * dp, dp, q, t.n_i, p.q_stride[2], D, p.q_stride[3], q_mul);
      } else {
        pack_cols(p.dtype, s.qt + r0, ld, q, t.n_i, p.q_stride[2], D, p.q_stride[3], q_mul);
      }
    }
    if (few > 0) {
      for (int64_t x = rows * dp; x < few * dp; ++x) s.qr[x] = 0.0f;
      // scores_few_rows writes lanes [0, few) of each S^T row: keep the rest finite
      for (int64_t x = 0; x < kBlockKeys * ld; ++x) s.st[x] = 0.0f;
    } else {
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t r = rows; r < ld; ++r) s.qt[d * ld + r] = 0.0f;
      }
    }
    for (int64_t r = 0; r < ld; ++r) {
      s.m[r] = -kInf;
      s.l[r] = 0.0f;
      s.drop_lo[r] = s.drop_hi[r] = 0;
    }
    for (int64_t x = 0; x < ld * dvp; ++x) s.o[x] = 0.0f;
    if (dropout) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = t.h_first + r / t.n_i, i = t.i_first + r % t.n_i;
        const uint64_t c =
            static_cast<uint64_t>(p.dropout_offset + row_offset(p.dropout_stride, t.batch, h, i));
        s.drop_lo[r] = static_cast<uint32_t>(c);
        s.drop_hi[r] = static_cast<uint32_t>(c >> 32);
      }
    }

    const float cap_mul = p.softcap * kLog2e;
    const bool fused_cap = softcap && !bias;  // a bias comes after the softcap
    const SoftmaxBlockFn softmax_plain =
        fused_cap ? &softmax_block<true, false> : &softmax_block<false, false>;
    const SoftmaxBlockFn softmax_masked =
        fused_cap ? &softmax_block<true, true> : &softmax_block<false, true>;
    const FewRowFns few_fns = few > 0 ? few_row_fns(few) : FewRowFns{nullptr, nullptr};
    const auto scores_few = few_fns.scores;
    // Few rows and nothing but the online softmax between the products: blocks without a
    // mask keep their scores packed (sp, past the S^T rows that masked blocks use).
    const auto softmax_packed = !softcap && !bias && !dropout ? few_fns.softmax : nullptr;
    float* const sp = s.st + kBlockKeys * ld;

    for (int64_t j0 = kmin; j0 <= kmax; j0 += kBlockKeys) {
      const int64_t bn = min64(kBlockKeys, kmax + 1 - j0);
      // K[j, d] of the key block: the tensor through its strides, or its float32 copy.
      const void* kb = offset(k, p.dtype, j0 * p.k_stride[2]);
      int64_t k_row = p.k_stride[2], k_d = p.k_stride[3];
      if (!k_native) {
        pack_rows(p.dtype, s.kbuf, dp, kb, bn, p.k_stride[2], D, p.k_stride[3], 1.0f);
        kb = s.kbuf;
        k_row = dp;
        k_d = 1;
      }
      const bool masked = max_lo > j0 || min_hi < j0 + bn - 1;
      const bool packed = softmax_packed != nullptr && !masked;
      // An unmasked block of the transposed product takes the fused softmax (unless the
      // scores need a softcap or bias first), and falls back when settle_exp_block refuses.
      bool fused = few == 0 && !masked && !softcap && !bias, rescale = false;
      if (fused) {
        start_exp_block(n_vecs, s.m, s.m_ref, s.bsum, s.bmax);
        gemm<false>(bn, n_vecs, D, static_cast<const float*>(kb), k_row, k_d, s.qt, ld, s.st, ld,
                    ExpEpilogue{s.m_ref, s.bsum, s.bmax});
        rescale = settle_exp_block(s.st, ld, bn, n_vecs, s.m_ref, s.bsum, s.bmax, s.m, s.l,
                                   s.alpha, &fused);
      }
      if (!fused) {
        if (packed) {
          scores_few(bn, dp, static_cast<const float*>(kb), k_row, s.qr, sp, few);
        } else if (few > 0) {
          scores_few(bn, dp, static_cast<const float*>(kb), k_row, s.qr, s.st, ld);
        } else {
          gemm<false>(bn, n_vecs, D, static_cast<const float*>(kb), k_row, k_d, s.qt, ld, s.st, ld);
        }
      }
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
      if (bias) {
        if (softcap) softcap_tile(s.st, ld, bn, n_vecs, cap_mul, nullptr);
        apply_bias(p, t.batch, t.h_first, t.i_first, t.n_i, rows, j0, bn, s.st, 1, ld);
      }
      if (!fused) {
        rescale = packed ? softmax_packed(sp, bn, s.m, s.l, s.alpha)
                         : (masked ? softmax_masked : softmax_plain)(
                               s.st, ld, bn, n_vecs, cap_mul, s.lo_rel, s.hi_rel, s.m, s.l, s.alpha);
      }
      if (rescale) rescale_rows(s.o, dvp, rows, s.alpha);
      if (dropout) dropout_tile(p, s, j0, bn, n_vecs, ld);
      // B[j, :] = V[j, :]: the tensor's rows, or their float32 copy padded to dvp.
      const void* vb = offset(v, p.dtype, j0 * p.v_stride[2]);
      int64_t v_row = p.v_stride[2];
      if (!v_native) {
        pack_rows(p.dtype, s.vbuf, dvp, vb, bn, p.v_stride[2], Dv, p.v_stride[3], 1.0f);
        vb = s.vbuf;
        v_row = dvp;
      }
      // A[r, j] = P[r, j] = P^T[j, r], packed or not
      gemm<true>(rows, static_cast<int>(dvp / kW), bn, packed ? sp : s.st, 1, packed ? few : ld,
                 static_cast<const float*>(vb), v_row, s.o, dvp);
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = t.h_first + r / t.n_i, i = t.i_first + r % t.n_i;
    const bool visible = s.lo[r] <= s.hi[r] && kmax >= 0 && s.l[r] > 0.0f;
    const float inv_l = visible ? 1.0f / s.l[r] : 0.0f;
    // O row r -> out row (b, h, i): zeros for rows that see nothing.
    float* o_row = s.o + r * dvp;
    if (!visible) {
      for (int64_t d = 0; d < Dv; ++d) o_row[d] = 0.0f;
    }
    const float lse = visible ? (s.m[r] + __builtin_log2f(s.l[r])) * kLn2 : -kInf;
    if (t.partial != nullptr) {
      for (int64_t d = 0; d < Dv; ++d) t.partial[r * Dv + d] = o_row[d] * inv_l;
      t.partial[rows * Dv + r] = lse;
      continue;
    }
    void* out = offset(p.out, p.dtype, row_offset(p.out_stride, t.batch, h, i));
    store_rows(p.dtype, out, 0, p.out_stride[3], o_row, dvp, 1, Dv, inv_l);
    if (p.lse != nullptr) p.lse[row_offset(p.lse_stride, t.batch, h, i)] = lse;
  }
}

size_t scratch_floats_fn(const SoftmaxFwdParams& p) { return scratch_floats(p); }

// out = sum_s exp(lse_s - lse) out_s with lse = log sum_s exp(lse_s), per row of the task;
// splits that saw no key (lse_s = -inf) add nothing, and a row no split saw stays zero.
void merge_splits(const SoftmaxFwdParams& p, const BlockTask& t, const float* partials,
                  int64_t stride, int n_splits) {
  const int64_t rows = t.n_heads * t.n_i, Dv = p.head_dim_v;
  const float* lses = partials + rows * Dv;  // of split 0; split s is s * stride further
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = t.h_first + r / t.n_i, i = t.i_first + r % t.n_i;
    float top = -kInf, total = 0.0f;
    for (int sp = 0; sp < n_splits; ++sp) top = __builtin_fmaxf(top, lses[sp * stride + r]);
    const float base = top == -kInf ? 0.0f : top;
    for (int sp = 0; sp < n_splits; ++sp) total += __builtin_expf(lses[sp * stride + r] - base);
    const float inv_total = total > 0.0f ? 1.0f / total : 0.0f;
    void* out = offset(p.out, p.dtype, row_offset(p.out_stride, t.batch, h, i));
    alignas(64) float acc[64];
    for (int64_t d0 = 0; d0 < Dv; d0 += 64) {
      const int64_t m = min64(64, Dv - d0);
      for (int64_t d = 0; d < m; ++d) acc[d] = 0.0f;
      for (int sp = 0; sp < n_splits; ++sp) {
        const float w = __builtin_expf(lses[sp * stride + r] - base);
        const float* o = partials + sp * stride + r * Dv + d0;
        for (int64_t d = 0; d < m; ++d) acc[d] += w * o[d];
      }
      store_rows(p.dtype, offset(out, p.dtype, d0 * p.out_stride[3]), p.out_stride[3], 1, acc, 1, m,
                 1, inv_total);
    }
    if (p.lse != nullptr) {
      const float lse = total > 0.0f ? base + __builtin_logf(total) : -kInf;
      p.lse[row_offset(p.lse_stride, t.batch, h, i)] = lse;
    }
  }
}

}  // namespace PYATTN_ISA
}  // namespace cpu
}  // namespace pyattn
