// Vector primitives of the CPU softmax attention kernels (forward and backward), written once
// with GCC/Clang vector extensions and compiled once per instruction set:
// attention_cpu_<isa>.cpp defines PYATTN_ISA, PYATTN_VEC_BYTES, PYATTN_TILE_ROWS and
// PYATTN_TILE_VECS, then includes the kernels, which include this.
//
// Everything here lives in a namespace named after the ISA and uses no standard-library
// templates: an inline function shared by TUs built with different -m flags could be
// merged by the linker into the AVX-512 copy and then run on a machine without it.
#pragma once

#include <cstdint>

#include "params.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

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

// may_alias: vectors are loaded from and stored to float / int32 scratch arrays.
typedef float vf __attribute__((vector_size(PYATTN_VEC_BYTES), __may_alias__));
typedef int32_t vi __attribute__((vector_size(PYATTN_VEC_BYTES), __may_alias__));
typedef uint32_t vu __attribute__((vector_size(PYATTN_VEC_BYTES), __may_alias__));
typedef uint64_t vq __attribute__((vector_size(PYATTN_VEC_BYTES), __may_alias__));  // kW / 2 lanes

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_inff();

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Element offset of row (b, h, i) of a (B, H, S, ...) tensor with element strides s.
inline int64_t row_offset(const int64_t* s, int64_t b, int64_t h, int64_t i) {
  return b * s[0] + h * s[1] + i * s[2];
}

inline vf splat(float x) { return x - vf{}; }  // x - (+0) == x exactly, unlike 0 + x
inline vi splat_i(int32_t x) { return x - vi{}; }
inline vu splat_u(uint32_t x) { return x - vu{}; }
// a > b ? a : b, which is what maxps computes; GCC does not always see that and may emit
// a compare and a blend, as it did for the clamp in vexp2 on AVX2.
inline vf vmax(vf a, vf b) {
#if PYATTN_VEC_BYTES == 32 && defined(__AVX__)
  return _mm256_max_ps(a, b);
#elif PYATTN_VEC_BYTES == 64 && defined(__AVX512F__)
  return _mm512_max_ps(a, b);
#else
  return a > b ? a : b;
#endif
}
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline vf& at(float* p) { return *reinterpret_cast<vf*>(p); }  // 64-byte aligned scratch
inline const vf& at(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline vf loadu(const float* p) {  // any alignment (rows of a caller's tensor)
  vf x;
  __builtin_memcpy(&x, p, sizeof(vf));
  return x;
}
inline vi iota_i() {
  vi x{};
  for (int l = 0; l < kW; ++l) x[l] = l;
  return x;
}

// ------------------------------------------------------------------------ exp2, tanh

// 2^f - 1 on f in [-0.5, 0.5]: f * (c1 + c2 f + ... + c5 f^4), relative error of 2^f
// below 1.8e-7, 1.5 ulp (least-squares fit with minimax reweighting, float32 coefficients,
// evaluated in float32). A sixth term took it to 1e-7 for one more FMA per exp2: 1 to 2%
// of the AVX2 forward.
inline vf exp2m1_reduced(vf f) {
  vf q = splat(1.3276707614e-03f);
  q = q * f + 9.6715092659e-03f;
  q = q * f + 5.5506926030e-02f;
  q = q * f + 2.4022242427e-01f;
  q = q * f + 6.9314700365e-01f;
  return q * f;
}

// Splits x (in [-127, 127)) into n + f, n integer, |f| <= 0.5, and
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

// 2^x for the softmax's x <= 0 (-inf included; any x < 127 works). The generic path clamps
// at -127, which makes 2^n = +0 from the exponent bits, so results below 2^-126 flush to 0
// without a select.
inline vf vexp2(vf x) {
#if PYATTN_VEC_BYTES == 64 && defined(__AVX512F__)
  // AVX-512: n by vrndscaleps and 2^n * 2^f by vscalefps, 3 instructions fewer than the
  // exponent-bit route. Clamping at -160 (NaN included, as the generic path clamps it)
  // makes 2^x exactly +0 there; results between 2^-149 and 2^-126 stay subnormal.
  const __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-160.0f));
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf f = xc - n;
  return _mm512_scalef_ps(exp2m1_reduced(f) + 1.0f, n);
#else
  vf f;
  const vf pow2n = split_exp2(vmax(x, splat(-127.0f)), &f);
  return pow2n + pow2n * exp2m1_reduced(f);
#endif
}

inline bool any_lane(vi mask) {
  int32_t acc = 0;
  for (int l = 0; l < kW; ++l) acc |= mask[l];
  return acc != 0;
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

// Scores of a tile (rows of n_vecs vectors, ld apart) -> softcap * tanh(scores) in log2 units
// (cap_mul = softcap * log2 e), when a bias comes after the softcap; dc (same layout, may be
// null) gets the derivative 1 - tanh^2 for the backward.
inline void softcap_tile(float* tile, int64_t ld, int64_t rows, int n_vecs, float cap_mul,
                         float* dc) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int v = 0; v < n_vecs; ++v) {
      const int64_t x = r * ld + v * kW;
      const vf th = vtanh(at(tile + x));
      if (dc != nullptr) at(dc + x) = 1.0f - th * th;
      at(tile + x) = th * cap_mul;
    }
  }
}

// ------------------------------------------------------------------------ matrix product

// The default tile epilogue: accumulators are stored as they are. An epilogue is a value
// with at_column(v0) (itself, for the tile whose columns start at vector v0) and
// operator()(acc), applied to the finished accumulators before they are stored.
struct StoreOnly {
  StoreOnly at_column(int) const { return {}; }
  template <int MR, int NV>
  void operator()(vf (&)[MR][NV]) const {}
};

// C[MR x NV*W] (+)= sum_k A[r, k] * B[k, :], A[r, k] = a[r * a_row + k * a_k], through epi.
template <int MR, int NV, bool ACCUMULATE, class Epi>
void gemm_tile(int64_t K, const float* __restrict a, int64_t a_row, int64_t a_k,
               const float* __restrict b, int64_t ldb, float* __restrict c, int64_t ldc, Epi epi) {
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
    for (int v = 0; v < NV; ++v) bv[v] = loadu(b + k * ldb + v * kW);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const vf av = splat(a_rows[r][k * a_k]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  epi(acc);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) at(c + r * ldc + v * kW) = acc[r][v];
  }
}

template <class Epi>
using TileFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                        int64_t, Epi);

template <bool ACCUMULATE, class Epi, int MR, int NV = kTileVecs>
TileFn<Epi> tile_for_vecs(int nv) {
  if constexpr (NV == 1) {
    return &gemm_tile<MR, 1, ACCUMULATE, Epi>;
  } else {
    return nv == NV ? &gemm_tile<MR, NV, ACCUMULATE, Epi>
                    : tile_for_vecs<ACCUMULATE, Epi, MR, NV - 1>(nv);
  }
}

template <bool ACCUMULATE, class Epi, int MR = kTileRows>
TileFn<Epi> tile_for(int mr, int nv) {
  if constexpr (MR == 1) {
    return tile_for_vecs<ACCUMULATE, Epi, 1>(nv);
  } else {
    return mr == MR ? tile_for_vecs<ACCUMULATE, Epi, MR>(nv)
                    : tile_for<ACCUMULATE, Epi, MR - 1>(mr, nv);
  }
}

// ------------------------------------------------------------------------ dot products

// One stage of a reduction of 2H vectors to H: lanes l of the result with bit H clear hold
// a[l] + a[l + H], lanes with it set hold b[l - H] + b[l].
template <int H>
inline vf fold_pair(vf a, vf b) {
  const vi c = iota_i();
  const vi high = (c & H) != 0;  // all ones where bit H of the lane is set
  const vi take_lo = c + (high & (kW - H));        // a[l], or b[l - H]
  const vi take_hi = c + (~high & H) + (high & kW);  // a[l + H], or b[l]
  return __builtin_shuffle(a, b, take_lo) + __builtin_shuffle(a, b, take_hi);
}

template <int H>
inline void fold_stages(vf* c) {
  for (int i = 0; i < H; ++i) c[i] = fold_pair<H>(c[2 * i], c[2 * i + 1]);
  if constexpr (H > 1) fold_stages<H / 2>(c);
}

constexpr int bit_reverse(int x) {
  int y = 0;
  for (int w = 1; w < kW; w <<= 1, x >>= 1) y = (y << 1) | (x & 1);
  return y;
}

// The kW horizontal sums of acc[0..kW) as one vector: lane l = sum of acc[l]'s lanes. The
// stages fold the top lane bit first, which leaves sums in bit-reversed order: feeding the
// inputs bit-reversed puts them back.
inline vf lane_sums(const vf* acc) {
  vf c[kW];
#pragma GCC unroll 16
  for (int i = 0; i < kW; ++i) c[i] = acc[bit_reverse(i)];
  fold_stages<kW / 2>(c);
  return c[0];
}

// S^T[j, r] = sum_d K[j, d] Qr[r, d] for keys j < bn and query rows r < R, written to
// st[j * ld + r] (ld = R: packed, kW / R keys per vector): dot products along d, for blocks
// of so few query rows (decoding) that the transposed product K . QT would fill only R of
// each vector's kW lanes. kW / R keys at a time make kW full-width accumulators, summed
// across lanes together by lane_sums. K rows (k_row floats apart) and Qr rows (dp floats
// apart, 64-byte aligned) hold dp floats, a whole number of vectors, zero past the head dim.
template <int R>
void scores_few_rows(int64_t bn, int64_t dp, const float* k, int64_t k_row, const float* qr,
                     float* st, int64_t ld) {
  static_assert(R >= 1 && kW % R == 0, "R must divide the vector width");
  constexpr int JB = kW / R;  // keys per step
  int64_t j0 = 0;
  for (; j0 + JB <= bn; j0 += JB) {
    vf acc[kW];
#pragma GCC unroll 16
    for (int i = 0; i < kW; ++i) acc[i] = vf{};
    for (int64_t d = 0; d < dp; d += kW) {
      vf qv[R];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) qv[r] = at(qr + r * dp + d);
#pragma GCC unroll 16
      for (int jj = 0; jj < JB; ++jj) {
        const vf kv = loadu(k + (j0 + jj) * k_row + d);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) acc[jj * R + r] += kv * qv[r];
      }
    }
    const vf sums = lane_sums(acc);  // lane jj * R + r: key j0 + jj, row r
    if (ld == R) {  // the packed layout: the lanes are already in place
      __builtin_memcpy(st + j0 * R, &sums, sizeof(vf));
      continue;
    }
#pragma GCC unroll 16
    for (int jj = 0; jj < JB; ++jj) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) st[(j0 + jj) * ld + r] = sums[jj * R + r];
    }
  }
  for (; j0 < bn; ++j0) {  // the last bn % JB keys, one at a time
    for (int r = 0; r < R; ++r) {
      vf acc{};
      for (int64_t d = 0; d < dp; d += kW) acc += loadu(k + j0 * k_row + d) * at(qr + r * dp + d);
      float sum = 0.0f;
      for (int l = 0; l < kW; ++l) sum += acc[l];
      st[j0 * ld + r] = sum;
    }
  }
}

// Lane l of the result: the max (MAX) or the sum of the lanes of x congruent to l modulo R,
// folding halves of the vector onto each other down to R lanes (R a power of two).
template <int R, bool MAX, int S = kW / 2>
inline vf fold_rows(vf x) {
  if constexpr (S < R) {
    return x;
  } else {
    const vf y = __builtin_shuffle(x, (iota_i() + S) & (kW - 1));
    return fold_rows<R, MAX, S / 2>(MAX ? vmax(x, y) : x + y);
  }
}

// C[M x n_vecs*W] (+)= A[M x K] * B[K x n_vecs*W] in register tiles; C is 64-byte aligned
// scratch, B rows of n_vecs*W contiguous floats at any alignment, A any floats (one scalar
// broadcast per element, through its strides).
//
// A tile of one row has too few independent accumulators to cover the FMA latency (4 on
// AVX2: one FMA a cycle instead of two). So a single row (decoding without GQA) takes tiles
// twice as wide, and a lone row left after the full tiles joins the last one, split in two
// (AVX2's 64 = 21 x 3 + 1 rows become 20 x 3 + 2 + 2).
template <bool ACCUMULATE, class Epi = StoreOnly>
void gemm(int64_t M, int n_vecs, int64_t K, const float* a, int64_t a_row, int64_t a_k,
          const float* b, int64_t ldb, float* c, int64_t ldc, Epi epi = {}) {
  constexpr int kWide = 2 * kTileVecs;
  int v_wide = 0;
  if (M == 1) {
    for (; v_wide + kWide <= n_vecs; v_wide += kWide) {
      gemm_tile<1, kWide, ACCUMULATE, Epi>(K, a, a_row, a_k, b + v_wide * kW, ldb,
                                           c + v_wide * kW, ldc, epi.at_column(v_wide));
    }
  }
  const int64_t rest = M % kTileRows;
  const int64_t full_end = rest == 1 && M > kTileRows ? M - 1 - kTileRows : M - rest;
  for (int v0 = v_wide; v0 < n_vecs; v0 += kTileVecs) {
    const int nv = static_cast<int>(min64(kTileVecs, n_vecs - v0));
    const TileFn<Epi> full = tile_for<ACCUMULATE, Epi>(kTileRows, nv);
    const Epi col_epi = epi.at_column(v0);
    int64_t r0 = 0;
    for (; r0 < full_end; r0 += kTileRows) {
      full(K, a + r0 * a_row, a_row, a_k, b + v0 * kW, ldb, c + r0 * ldc + v0 * kW, ldc, col_epi);
    }
    while (r0 < M) {  // the rest: at most two tiles of at least two rows, or one row
      const int mr = static_cast<int>(M - r0 > kTileRows ? (M - r0 + 1) / 2 : M - r0);
      tile_for<ACCUMULATE, Epi>(mr, nv)(K, a + r0 * a_row, a_row, a_k, b + v0 * kW, ldb,
                                        c + r0 * ldc + v0 * kW, ldc, col_epi);
      r0 += mr;
    }
  }
}

// ------------------------------------------------------------------------ dtypes

enum : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int elem_bytes(int dtype) { return dtype == kFloat32 ? 4 : 2; }

inline float bits_to_float(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays NaN (quieted).
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// IEEE half -> float: the exponent is rebiased by a multiplication, which also turns
// subnormal halves into normal floats; infinities and NaN keep an all-ones exponent.
// Branch-free (a mask, not a select, which GCC 12 does not if-convert here), so that loops
// over it vectorize.
inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t rest = h & 0x7FFFu;
  const uint32_t finite = float_to_bits(bits_to_float(rest << 13) * 0x1p112f);
  const uint32_t special = (rest << 13) | 0x7F800000u;
  const uint32_t is_special = 0u - static_cast<uint32_t>(rest >= 0x7C00u);  // all ones or zero
  return bits_to_float((special & is_special) | (finite & ~is_special) | sign);
}

// float -> IEEE half, round to nearest even (overflow to infinity, subnormals included).
inline uint16_t float_to_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);  // NaN
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {
    // |f| < 2^-14, a subnormal half: adding 0.5 (2^-1) leaves the half's 10 mantissa
    // bits, correctly rounded to nearest even, in the float's low bits.
    const float r = bits_to_float(a) + 0.5f;
    return static_cast<uint16_t>(sign | (float_to_bits(r) - 0x3F000000u));
  }
  const uint32_t odd = (a >> 13) & 1u;
  return static_cast<uint16_t>(sign | ((a + 0xC8000FFFu + odd) >> 13));  // rebias by -112 << 23
}

template <int DT>
struct Elem;
template <>
struct Elem<kFloat32> {
  typedef float T;
  static float load(const float* p) { return *p; }
  static void store(float* p, float x) { *p = x; }
};
template <>
struct Elem<kFloat16> {
  typedef uint16_t T;
  static float load(const uint16_t* p) { return f16_to_float(*p); }
  static void store(uint16_t* p, float x) { *p = float_to_f16(x); }
};
template <>
struct Elem<kBFloat16> {
  typedef uint16_t T;
  static float load(const uint16_t* p) { return bf16_to_float(*p); }
  static void store(uint16_t* p, float x) { *p = float_to_bf16(x); }
};

// dst[r * ld + c] = mul * src[r * rs + c * cs] for r < rows, c < cols, and zeros in the
// columns [cols, ld) of those rows (ld padding keeps vector lanes finite).
template <int DT>
void pack_rows_t(float* dst, int64_t ld, const void* src_v, int64_t rows, int64_t rs,
                 int64_t cols, int64_t cs, float mul) {
  typedef typename Elem<DT>::T T;
  const T* src = static_cast<const T*>(src_v);
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * rs;
    float* d = dst + r * ld;
    if (cs == 1) {
      for (int64_t c = 0; c < cols; ++c) d[c] = Elem<DT>::load(s + c) * mul;
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = Elem<DT>::load(s + c * cs) * mul;
    }
    for (int64_t c = cols; c < ld; ++c) d[c] = 0.0f;
  }
}

// dst[c * ld + r] = mul * src[r * rs + c * cs] for r < rows, c < cols: the transposed copy
// (padding is the caller's).
template <int DT>
void pack_cols_t(float* dst, int64_t ld, const void* src_v, int64_t rows, int64_t rs,
                 int64_t cols, int64_t cs, float mul) {
  typedef typename Elem<DT>::T T;
  const T* src = static_cast<const T*>(src_v);
  for (int64_t c = 0; c < cols; ++c) {
    float* d = dst + c * ld;
    for (int64_t r = 0; r < rows; ++r) d[r] = Elem<DT>::load(src + r * rs + c * cs) * mul;
  }
}

// src (rows x cols, row-major with ld) * mul -> dst[r * rs + c * cs] in dtype DT.
template <int DT>
void store_rows_t(void* dst_v, int64_t rs, int64_t cs, const float* src, int64_t ld,
                  int64_t rows, int64_t cols, float mul) {
  typedef typename Elem<DT>::T T;
  T* dst = static_cast<T*>(dst_v);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      Elem<DT>::store(dst + r * rs + c * cs, src[r * ld + c] * mul);
    }
  }
}

#define PYATTN_DTYPE_SWITCH(dtype, DT, ...)      \
  switch (dtype) {                               \
    case kFloat16: {                             \
      constexpr int DT = kFloat16;               \
      __VA_ARGS__;                               \
    } break;                                     \
    case kBFloat16: {                            \
      constexpr int DT = kBFloat16;              \
      __VA_ARGS__;                               \
    } break;                                     \
    default: {                                   \
      constexpr int DT = kFloat32;               \
      __VA_ARGS__;                               \
    } break;                                     \
  }

inline void pack_rows(int dtype, float* dst, int64_t ld, const void* src, int64_t rows, int64_t rs,
                      int64_t cols, int64_t cs, float mul) {
  PYATTN_DTYPE_SWITCH(dtype, DT, pack_rows_t<DT>(dst, ld, src, rows, rs, cols, cs, mul));
}
inline void pack_cols(int dtype, float* dst, int64_t ld, const void* src, int64_t rows, int64_t rs,
                      int64_t cols, int64_t cs, float mul) {
  PYATTN_DTYPE_SWITCH(dtype, DT, pack_cols_t<DT>(dst, ld, src, rows, rs, cols, cs, mul));
}
inline void store_rows(int dtype, void* dst, int64_t rs, int64_t cs, const float* src, int64_t ld,
                       int64_t rows, int64_t cols, float mul) {
  PYATTN_DTYPE_SWITCH(dtype, DT, store_rows_t<DT>(dst, rs, cs, src, ld, rows, cols, mul));
}
// Element pointer arithmetic on a tensor of dtype `dtype`.
inline const void* offset(const void* base, int dtype, int64_t elems) {
  return static_cast<const char*>(base) + elems * elem_bytes(dtype);
}
inline void* offset(void* base, int dtype, int64_t elems) {
  return static_cast<char*>(base) + elems * elem_bytes(dtype);
}

// ------------------------------------------------------------------------ dropout

// (GCC 12 -Wall takes the undefined pass-through operand inside _mm512_mul_epu32 for
// an uninitialized variable.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// 64-bit products of the even 32-bit lanes of x with a (pmuludq; vector extensions have no
// widening multiply, and a 64-bit one is emulated with shifts on AVX2).
inline vq mul_even_u32(vu x, uint32_t a) {
#if defined(__AVX512F__) && PYATTN_VEC_BYTES == 64
  return (vq)_mm512_mul_epu32((__m512i)x, (__m512i)splat_u(a));
#elif defined(__AVX2__) && PYATTN_VEC_BYTES == 32
  return (vq)_mm256_mul_epu32((__m256i)x, (__m256i)splat_u(a));
#elif defined(__SSE2__) && PYATTN_VEC_BYTES == 16
  return (vq)_mm_mul_epu32((__m128i)x, (__m128i)splat_u(a));
#else
  return ((vq)x & 0xFFFFFFFFull) * static_cast<uint64_t>(a);
#endif
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// High and low 32 bits of a * x, per lane.
inline void mul_hi_lo(vu x, uint32_t a, vu* hi, vu* lo) {
  const vq even = mul_even_u32(x, a);
  const vq odd = mul_even_u32((vu)((vq)x >> 32), a);
  const vi odd_lane = (iota_i() & 1) != 0;
  *lo = x * a;
  *hi = odd_lane ? (vu)odd : (vu)(even >> 32);  // the high halves sit in the odd lanes
}

// Philox4x32-10 (Salmon et al. 2011), first output word, for counters (c0, c1, 0, 0) and
// key (seed low 32 bits, seed high 32 bits): pyattn.reference.philox_uint32.
inline vu philox_first(vu c0, vu c1, uint64_t seed) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  vu c2{}, c3{};
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    vu hi_a, lo_a, hi_b, lo_b;
    mul_hi_lo(c0, 0xD2511F53u, &hi_a, &lo_a);
    mul_hi_lo(c2, 0xCD9E8D57u, &hi_b, &lo_b);
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Per lane, the 64-bit counter (lo, hi) plus add (< 2^32).
inline void counter_add(vu* lo, vu* hi, vu add) {
  const vu sum = *lo + add;
  *hi += (vu)(sum < *lo) & 1u;  // carry
  *lo = sum;
}

// Dropout multipliers (1/(1-p) where kept, else 0) of the W counters lo + 2^32 hi.
inline vf dropout_multiplier(const SoftmaxFwdParams& p, vu lo, vu hi) {
  const vu bits = philox_first(lo, hi, p.dropout_seed);
  const vf inv_keep = splat(1.0f / (1.0f - p.dropout_p));
  return (bits >> 8) >= p.dropout_threshold ? inv_keep : vf{};
}

// ------------------------------------------------------------------------ attn_bias

// Adds the bias to, or applies the bool mask on, a tile of scores in log2 units.
// Element (r, j) of the tile is tile[r * ld_r + j * ld_j]: row r is query i_first + r % n_i
// of head h_first + r / n_i, column j is key j0 + j.
inline void apply_bias(const SoftmaxFwdParams& p, int64_t batch, int64_t h_first, int64_t i_first,
                       int64_t n_i, int64_t n_rows, int64_t j0, int64_t bn, float* tile,
                       int64_t ld_r, int64_t ld_j) {
  const int64_t* s = p.bias_stride;
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t h = h_first + r / n_i, i = i_first + r % n_i;
    const int64_t row = row_offset(s, batch, h, i) + j0 * s[3];
    float* t = tile + r * ld_r;
    if (p.bias_kind == SoftmaxFwdParams::kBiasBool) {
      const uint8_t* m = static_cast<const uint8_t*>(p.bias) + row;
      for (int64_t j = 0; j < bn; ++j) {
        if (m[j * s[3]] == 0) t[j * ld_j] = -kInf;
      }
    } else {
      const float* x = static_cast<const float*>(p.bias) + row;
      for (int64_t j = 0; j < bn; ++j) t[j * ld_j] += x[j * s[3]] * kLog2e;
    }
  }
}

}  // namespace PYATTN_ISA
}  // namespace cpu
}  // namespace pyattn
