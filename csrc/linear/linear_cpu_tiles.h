// Building blocks of the CPU linear attention head kernels, compiled once per instruction
// set (linear_cpu_<isa>.cpp defines PYATTN_ISA etc., see ../softmax/attention_cpu_simd.h,
// whose vector types, register-tile products and dtype conversions this reuses).
//
// Chunk buffers are float32 row-major with leading dimensions rounded up to 16 floats and
// zero padding, so every product runs on whole vectors.
#pragma once

#include <cmath>
#include <cstdint>

#include "../softmax/attention_cpu_simd.h"
#include "linear_params.h"

namespace pyattn {
namespace cpu {
namespace PYATTN_ISA {

constexpr int64_t kChunk = 64;  // tokens per chunk (C)
static_assert(kChunk % 16 == 0, "chunk rows must fill whole vectors on every ISA");

inline int64_t pad16(int64_t x) { return round_up(x, 16); }
inline int vecs(int64_t n) { return static_cast<int>((n + kW - 1) / kW); }

// Hands out 64-byte aligned pieces of a worker's scratch; with base == nullptr it only
// counts, so sizing and carving are one piece of code.
struct Bump {
  float* base;
  size_t used = 0;
  float* take(int64_t n) {
    float* r = base != nullptr ? base + used : nullptr;
    used += static_cast<size_t>(pad16(n < 1 ? 1 : n));
    return r;
  }
};

// exp(x) for x <= 0 to a couple of ulp whatever |x| (vexp2(x * log2 e) loses the rounding
// of the product, ~|x| ulp): Cody-Waite reduction x = n ln2 + r with ln2 split in two,
// then a degree-7 polynomial of e^r on |r| <= ln2 / 2 (the classic single-precision
// minimax coefficients). x below -87 flushes to 0.
inline vf vexp_neg(vf x) {
  const vf xc = vmax(x, splat(-87.0f));
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = xc * kLog2e + magic;
  const vf n = t - magic;
  const vf r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vf er = p * (r * r) + r + 1.0f;
  const vi pow_bits = (((vi)t - (vi)magic) + 127) << 23;
  return x < -87.0f ? vf{} : er * (vf)pow_bits;
}

// ------------------------------------------------------------------ products

// Which part of a triangular product a row tile [r0, r0 + mr) needs:
//   kFull    all of K and N;
//   kLowerN  columns [0, r0 + mr)       (P = Q K^T below the diagonal);
//   kLowerK  k in [0, k_prefix + r0 + mr) (A lower triangular in its last columns);
//   kUpperK  k in [r0, K)                (A upper triangular: a transposed lower one).
enum Tri { kFull, kLowerN, kLowerK, kUpperK };

// C[M x N] (+)= A[M x K] B[K x N]; A[r, k] = a[r * a_row + k * a_k] (any floats), B and C
// 64-byte aligned with leading dimensions ldb, ldc multiples of 16. Columns up to the
// next whole vector are computed too (B's padding must be finite there).
template <bool ACC, Tri TRI>
void gemm_tri(int64_t M, int64_t N, int64_t K, int64_t k_prefix, const float* a, int64_t a_row,
              int64_t a_k, const float* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t r0 = 0; r0 < M; r0 += kTileRows) {
    const int64_t mr = min64(kTileRows, M - r0), end = r0 + mr;
    int64_t k0 = 0, k1 = K, n = N;
    if (TRI == kLowerN) n = min64(N, end);
    if (TRI == kLowerK) k1 = min64(K, k_prefix + end);
    if (TRI == kUpperK) k0 = min64(r0, K);
    if (n <= 0) continue;
    if (k1 <= k0) {
      if (!ACC) {
        for (int64_t r = r0; r < end; ++r) {
          for (int v = 0; v < vecs(n); ++v) at(c + r * ldc + v * kW) = vf{};
        }
      }
      continue;
    }
    gemm<ACC>(mr, vecs(n), k1 - k0, a + r0 * a_row + k0 * a_k, a_row, a_k, b + k0 * ldb, ldb,
              c + r0 * ldc, ldc);
  }
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols; dst[c * ld_dst + r] = 0
// for r in [rows, ld_dst).
inline void transpose(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                      int64_t cols) {
  for (int64_t c = 0; c < cols; ++c) {
    float* d = dst + c * ld_dst;
    for (int64_t r = 0; r < rows; ++r) d[r] = src[r * ld_src + c];
    for (int64_t r = rows; r < ld_dst; ++r) d[r] = 0.0f;
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  vf acc{};
  for (int v = 0; v < vecs(n); ++v) acc += at(a + v * kW) * at(b + v * kW);  // padded: zeros
  float s = 0.0f;
  for (int l = 0; l < kW; ++l) s += acc[l];
  return s;
}

// row[0, n) *= x over whole vectors.
inline void scale_row(float* row, int64_t n, float x) {
  const vf m = splat(x);
  for (int v = 0; v < vecs(n); ++v) at(row + v * kW) *= m;
}

inline void zero(float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = 0.0f;
}

// ------------------------------------------------------------------ loading chunks

// dst rows [0, rows_total) x [0, ld): map(src[r * rs + c * cs]) * mul for r < rows, c < cols,
// zero elsewhere. deriv (same layout, may be null) gets map'(x) * dmul (zero in the padding).
// map: LinearFwdParams::FeatureMap; elu means elu(x) + 1.
inline void pack_mapped(int dtype, float* dst, int64_t ld, int64_t rows_total, const void* src,
                        int64_t rows, int64_t rs, int64_t cols, int64_t cs, int map, float mul,
                        float* deriv, float dmul) {
  pack_rows(dtype, dst, ld, src, rows, rs, cols, cs, 1.0f);
  zero(dst + rows * ld, (rows_total - rows) * ld);
  if (deriv != nullptr) zero(deriv + rows * ld, (rows_total - rows) * ld);
  const int nv = vecs(cols);
  const vf vmul = splat(mul), vdmul = splat(dmul), one = splat(1.0f);
  for (int64_t r = 0; r < rows; ++r) {
    float* x = dst + r * ld;
    float* dx = deriv != nullptr ? deriv + r * ld : nullptr;
    for (int v = 0; v < nv; ++v) {
      const vf in = at(x + v * kW);
      vf y, d;
      if (map == LinearFwdParams::kElu) {
        const vf e = vexp_neg(vmin(in, vf{}));
        y = in > 0.0f ? in + 1.0f : e;
        d = in > 0.0f ? one : e;
      } else if (map == LinearFwdParams::kRelu) {
        y = in > 0.0f ? in : vf{};
        d = in > 0.0f ? one : vf{};
      } else {
        y = in;
        d = one;
      }
      at(x + v * kW) = y * vmul;
      if (dx != nullptr) at(dx + v * kW) = d * vdmul;
    }
    // map(0) may be nonzero (elu + 1): restore the zero padding
    for (int64_t c = cols; c < ld; ++c) x[c] = 0.0f;
    if (dx != nullptr) {
      for (int64_t c = cols; c < ld; ++c) dx[c] = 0.0f;
    }
  }
}

// Plain rows (v, dout): float32 copies, zero padded to ld and to rows_total rows.
inline void pack_plain(int dtype, float* dst, int64_t ld, int64_t rows_total, const void* src,
                       int64_t rows, int64_t rs, int64_t cols, int64_t cs) {
  if (src == nullptr) {
    zero(dst, rows_total * ld);
    return;
  }
  pack_rows(dtype, dst, ld, src, rows, rs, cols, cs, 1.0f);
  zero(dst + rows * ld, (rows_total - rows) * ld);
}

// A float32 (rows x cols) matrix with strides (rs, cs) -> dst (ld, zero padded); null: zeros.
inline void load_state(float* dst, int64_t ld, int64_t rows_total, const float* src, int64_t rows,
                       int64_t rs, int64_t cols, int64_t cs) {
  zero(dst, rows_total * ld);
  if (src == nullptr) return;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[r * ld + c] = src[r * rs + c * cs];
  }
}

inline void save_state(float* dst, int64_t rs, int64_t cs, const float* src, int64_t ld,
                       int64_t rows, int64_t cols) {
  if (dst == nullptr) return;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[r * rs + c * cs] = src[r * ld + c];
  }
}

// ------------------------------------------------------------------ decay in a chunk

// (No std::max: see attention_cpu_simd.h on templates shared by TUs of different ISAs.)
inline float clamp_log_decay(float x) { return x > -1e4f ? x : -1e4f; }

// For tokens [t0, t0 + n) of (b, h): L_t = sum_{r <= t} log_decay_r inside the chunk, kept
// as a float pair L = hi + lo (rows past n repeat L_{n-1}) so that L_t - L_s is accurate to
// the difference's own rounding, not to that of |L_t|; g_t = exp(L_t) (decay since the
// chunk's start), w_s = exp(L_{n-1} - L_s) (decay until its end), *G = exp(L_{n-1}).
// Weights are differences of in-chunk sums, all <= 0, so nothing overflows. Returns false
// (and sets nothing but *G = 1) when there is no decay.
inline bool chunk_decay(const LinearFwdParams& p, int64_t b, int64_t h, int64_t t0, int64_t n,
                        float* L, float* g, float* w, float* G) {
  *G = 1.0f;
  if (p.log_decay == nullptr) return false;
  const float* ld = p.log_decay + b * p.decay_stride[0] + h * p.decay_stride[1];
  float* lo = L + kChunk;
  double sums[kChunk];
  double acc = 0.0;
  for (int64_t t = 0; t < kChunk; ++t) {
    // clamped: a -inf (a reset of the state) must not meet another -inf in L_t - L_s
    if (t < n) acc += clamp_log_decay(ld[(t0 + t) * p.decay_stride[2]]);
    sums[t] = acc;
    L[t] = static_cast<float>(acc);
    lo[t] = static_cast<float>(acc - static_cast<double>(L[t]));
  }
  for (int64_t t = 0; t < kChunk; ++t) {
    g[t] = static_cast<float>(std::exp(sums[t]));
    w[t] = static_cast<float>(std::exp(acc - sums[t]));
  }
  *G = static_cast<float>(std::exp(acc));
  return true;
}

// Row t of the intra-chunk weights over s in [0, n_cols) (whole vectors): mask s <= t and,
// with decay, exp(L_t - L_s) (L from chunk_decay: 2 * kChunk floats, hi then lo). Calls
// fn(vector index, keep mask, weight).
template <typename Fn>
inline void for_row_weights(int64_t t, int64_t n_cols, const float* L, bool decay, Fn fn) {
  const vi lane = iota_i();
  const vf lt = splat(decay ? L[t] : 0.0f), lt_lo = splat(decay ? L[kChunk + t] : 0.0f);
  for (int v = 0; v < vecs(n_cols); ++v) {
    const vi keep = (lane + v * kW) <= static_cast<int32_t>(t);
    vf wgt = splat(1.0f);
    if (decay) {
      const vf diff = (lt - at(L + v * kW)) + (lt_lo - at(L + kChunk + v * kW));
      wgt = vexp_neg(vmin(diff, vf{}));
    }
    fn(v, keep, wgt);
  }
}

// Element offset of (b, h, t) in a (B, H, S, ...) tensor.
inline int64_t off4(const int64_t* s, int64_t b, int64_t h, int64_t t) {
  return b * s[0] + h * s[1] + t * s[2];
}

}  // namespace PYATTN_ISA
}  // namespace cpu
}  // namespace pyattn
