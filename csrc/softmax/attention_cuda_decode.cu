// Split-KV ("flash-decoding") softmax attention forward for 1..16 queries over many keys, and
// the lse merge of its splits. Float32 accumulation on CUDA cores (no tensor cores, no tf32).
//
// Decoding is memory-bound, so the layout is built around reading K and V once: a CTA serves
// up to kDecodeRows (query head, query) rows of ONE kv head (all query heads of its GQA group
// times all queries) over one chunk of keys, and stages each tile of K and V in shared memory
// where every row uses it. The keys are cut into chunks (splits) so that small batches still
// fill the GPU; each split writes a normalised partial output and its lse, and a second kernel
// merges them (lse_merge.h). With one split the first kernel writes out and lse directly.
// Launch plan, tile sizes and the shared-memory layout: attention_cuda_decode_plan.h.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../common/cuda_elementwise.cuh"
#include "../common/cuda_launch_macro.h"
#include "attention_cuda_decode_plan.h"
#include "attention_cuda_kernels.h"
#include "lse_merge.h"

namespace pyattn {
namespace cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// Element conversions. A "chunk" is 16 bytes of T (8 halves or 4 floats): the unit of every
// global load and shared-memory access of K and V.

__device__ __forceinline__ void chunk_to_floats(const uint4& c, float (&f)[4]) {
  f[0] = __uint_as_float(c.x);
  f[1] = __uint_as_float(c.y);
  f[2] = __uint_as_float(c.z);
  f[3] = __uint_as_float(c.w);
}

template <typename Pair>
__device__ __forceinline__ float2 pair_to_float2(uint32_t bits);
template <>
__device__ __forceinline__ float2 pair_to_float2<__half2>(uint32_t bits) {
  __half2 h;
  memcpy(&h, &bits, 4);
  return __half22float2(h);
}
template <>
__device__ __forceinline__ float2 pair_to_float2<__nv_bfloat162>(uint32_t bits) {
  __nv_bfloat162 h;
  memcpy(&h, &bits, 4);
  return __bfloat1622float2(h);
}

template <typename Pair>
__device__ __forceinline__ void pairs_to_floats(const uint4& c, float (&f)[8]) {
  const uint32_t w[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = pair_to_float2<Pair>(w[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}
__device__ __forceinline__ void chunk_to_floats(const uint4& c, float (&f)[8], __half) { pairs_to_floats<__half2>(c, f); }
__device__ __forceinline__ void chunk_to_floats(const uint4& c, float (&f)[8], __nv_bfloat16) {
  pairs_to_floats<__nv_bfloat162>(c, f);
}

template <typename T>
__device__ __forceinline__ void unpack_chunk(const uint4& c, float (&f)[16 / sizeof(T)]) {
  if constexpr (std::is_same<T, float>::value) {
    chunk_to_floats(c, f);
  } else {
    chunk_to_floats(c, f, T());
  }
}

// 16-byte asynchronous copy global -> shared (sm_80+, bypassing L1: K and V are streamed);
// only the first `src_bytes` are read, the rest of the 16 is zero-filled.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
#if defined(PYATTN_CUDA_EMULATION)
  pyattn_emu::cp_async_16(d, src, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { pyattn_emu::cp_async_commit(); }
__device__ __forceinline__ void cp_async_wait_all() { pyattn_emu::cp_async_wait(0); }
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
#endif

// Elements d0 .. d0 + 16/sizeof(T) - 1 of a row (element stride `stride`) into 16 bytes of
// shared memory, zero past `dim` and for a key outside the tile's range (`live` false; the
// tile's P.V then multiplies exact zeros, so no garbage can reach the sums). An asynchronous
// 16-byte copy when the row is contiguous and 16-byte aligned (`vec`: the launcher checked the
// base pointer and every outer stride); otherwise element by element. All three dtypes have
// +0.0 as the all-zero bit pattern.
template <typename T>
__device__ __forceinline__ void stage_chunk(unsigned char* dst, const T* row, int64_t stride, int d0, int dim,
                                            bool vec, bool live) {
  constexpr int kE = 16 / sizeof(T);
  if (!live || d0 >= dim) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    return;
  }
  if (vec) {
    const int n = dim - d0 < kE ? dim - d0 : kE;
    cp_async_16(dst, row + d0, n * static_cast<int>(sizeof(T)));
    return;
  }
  using Raw = typename std::conditional<sizeof(T) == 4, uint32_t, uint16_t>::type;
  const Raw* raw = reinterpret_cast<const Raw*>(row);
  Raw e[kE];
#pragma unroll
  for (int x = 0; x < kE; ++x) e[x] = d0 + x < dim ? raw[(d0 + x) * stride] : Raw(0);
  uint4 c;
  memcpy(&c, e, 16);
  *reinterpret_cast<uint4*>(dst) = c;
}

// ---------------------------------------------------------------------------------------------
// Compile-time shape of the split kernel for one (T, bucket).
template <typename T, int kHeadDim>
struct Cfg {
  static constexpr int kVec = 16 / sizeof(T);                   // elements per chunk
  static constexpr int kChunksPerRow = kHeadDim / kVec;         // chunks per K / V row
  static constexpr int kN = decode_tile_keys(sizeof(T), kHeadDim);  // keys per tile
  static constexpr int kLoads = kN * kChunksPerRow / kDecodeThreads;  // chunks per thread per tensor
  // Scores: thread (key c = tid % kN, row group tid / kN) scores rows rg, rg + kQkGroups, ...
  static constexpr int kQkGroups = kDecodeThreads / kN;
  static constexpr int kQkSlots = kDecodeRows / kQkGroups;
  // Softmax: warp w owns rows w, w + kDecodeWarps, ...; lane covers keys lane, lane + 32, ...
  static constexpr int kSmRows = kDecodeRows / kDecodeWarps;
  static constexpr int kSmKeys = (kN + 31) / 32;
  // P.V: thread (column chunk tid % kChunksPerRow, row group tid / kChunksPerRow) owns the
  // kVec output columns of that chunk for rows rg, rg + kPvGroups, ...
  static constexpr int kPvGroups = kDecodeThreads / kChunksPerRow;
  static constexpr int kPvSlots = kDecodeRows / kPvGroups;
  // Shared memory (attention_cuda_decode_plan.h), as scalars for device code.
  static constexpr int64_t kKRow = decode_smem_layout(sizeof(T), kHeadDim).k_row_bytes;
  static constexpr int64_t kVRow = decode_smem_layout(sizeof(T), kHeadDim).v_row_bytes;
  static constexpr int kPRow = static_cast<int>(decode_smem_layout(sizeof(T), kHeadDim).p_row_floats);
  static constexpr int64_t kStage = decode_smem_layout(sizeof(T), kHeadDim).stage_bytes;
  static constexpr int64_t kKOff = decode_smem_layout(sizeof(T), kHeadDim).k_off;
  static constexpr int64_t kVOff = decode_smem_layout(sizeof(T), kHeadDim).v_off;
  static constexpr int64_t kQOff = decode_smem_layout(sizeof(T), kHeadDim).q_off;
  static constexpr int64_t kPOff = decode_smem_layout(sizeof(T), kHeadDim).p_off;
  static constexpr int64_t kLoOff = decode_smem_layout(sizeof(T), kHeadDim).key_lo_off;
  static constexpr int64_t kHiOff = decode_smem_layout(sizeof(T), kHeadDim).key_hi_off;
  static constexpr int64_t kAlphaOff = decode_smem_layout(sizeof(T), kHeadDim).alpha_off;
  static constexpr int64_t kMOff = decode_smem_layout(sizeof(T), kHeadDim).m_off;
  static constexpr int64_t kLOff = decode_smem_layout(sizeof(T), kHeadDim).l_off;
  static constexpr int64_t kSmem = decode_smem_layout(sizeof(T), kHeadDim).total;
  // CTAs per SM the register budget is sized for: as many as shared memory lets reside on an
  // sm_90 SM (227 KiB opt-in, ~1 KiB reserved per CTA), at most kDecodeMaxCtasPerSm.
  static constexpr int kMinBlocks = decode_ctas_per_sm(kSmem, 227 * 1024);

  static_assert(kHeadDim % kVec == 0, "bucket must be whole chunks");
  static_assert(kN % 16 == 0 && kDecodeThreads % kN == 0, "a tile's keys must tile the CTA");
  static_assert(kN * kChunksPerRow % kDecodeThreads == 0, "tile loads must spread evenly");
  static_assert(kDecodeRows % kQkGroups == 0 && kDecodeRows % kPvGroups == 0, "row groups must tile the rows");
  static_assert(kDecodeThreads % kChunksPerRow == 0, "column chunks must tile the CTA");
  static_assert(kKRow % 16 == 0 && kVRow % 16 == 0 && kStage % 16 == 0 && kPRow % 4 == 0,
                "rows must stay 16-byte aligned");
};

// Per-launch values the host derives once (see softmax_decode below).
struct DecodeArgs {
  int64_t group = 1;       // query heads per kv head
  int64_t group_rows = 0;  // group * seq_q rows per kv head
  int64_t row_blocks = 1;  // ceil(group_rows / kDecodeRows)
  int64_t n_ctas = 0;      // batch * heads_kv * splits * row_blocks
  int64_t key_begin = 0, key_end = 0;  // keys some row sees
  int64_t chunk = 0;                   // keys per split (a multiple of the tile)
  int splits = 1;
  int64_t rows_total = 0;  // batch * heads_q * seq_q: the workspace's row count
  float* ws_out = nullptr;  // [splits][rows_total][head_dim_v]
  float* ws_lse = nullptr;  // [splits][rows_total]
  bool k_vec = false, v_vec = false;  // 16-byte loads allowed
  bool softcap = false;
  float q_mul = 1.0f;    // folded into q: scale * log2(e), or scale / softcap
  float cap_mul = 1.0f;  // softcap * log2(e)
};

// Where CTA-local row r (< kDecodeRows) of row block rb lives: query head h, query i.
struct RowId {
  int64_t h, i;
};
__device__ __forceinline__ RowId row_id(const SoftmaxFwdParams& p, const DecodeArgs& a, int64_t kvh, int64_t gr) {
  return RowId{kvh * a.group + gr / p.seq_q, gr % p.seq_q};
}

// Starts copying keys [j0, j0 + kN) of K and V into stage `stage` (zero past key_end); the
// caller commits the group and waits for it before the tile is read.
template <typename T, int kHeadDim>
__device__ __forceinline__ void stage_tile(const SoftmaxFwdParams& p, const DecodeArgs& a, unsigned char* smem,
                                           int stage, const T* k_bh, const T* v_bh, int64_t j0, int64_t key_end) {
  using C = Cfg<T, kHeadDim>;
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  unsigned char* base = smem + stage * C::kStage;
  // Not unrolled: the copies are asynchronous anyway, and unrolling the element-wise fallback
  // would keep dozens of loads and addresses live next to the accumulators.
#pragma unroll 1
  for (int c = 0; c < C::kLoads; ++c) {
    const int x = threadIdx.x + c * kDecodeThreads;
    const int key = x / C::kChunksPerRow, u = x % C::kChunksPerRow;
    const int64_t j = j0 + key;
    const bool live = j < key_end;
    const int64_t jj = live ? j : 0;  // never form a pointer past the tensor
    stage_chunk(base + C::kKOff + key * C::kKRow + u * 16, k_bh + jj * p.k_stride[2], p.k_stride[3], u * C::kVec, D,
                a.k_vec, live);
    stage_chunk(base + C::kVOff + key * C::kVRow + u * 16, v_bh + jj * p.v_stride[2], p.v_stride[3], u * C::kVec, Dv,
                a.v_vec, live);
  }
}

// Scores of the tile in log2 units: p_s[r][c] = log2(e) * cap(scale * q_r . k_{j0+c}), or -inf
// where row r may not see key j0 + c (mask, or past the CTA's keys). q_s is pre-scaled, so the
// dot already is scale * log2(e) * q.k (no softcap) or scale / softcap * q.k (softcap).
template <typename T, int kHeadDim>
__device__ __forceinline__ void tile_scores(const SoftmaxFwdParams& p, const DecodeArgs& a, unsigned char* smem,
                                            int stage, int nrows, int64_t j0, int64_t key_end) {
  using C = Cfg<T, kHeadDim>;
  const float* q_s = reinterpret_cast<const float*>(smem + C::kQOff);
  float* p_s = reinterpret_cast<float*>(smem + C::kPOff);
  const int64_t* lo_s = reinterpret_cast<const int64_t*>(smem + C::kLoOff);
  const int64_t* hi_s = reinterpret_cast<const int64_t*>(smem + C::kHiOff);
  const int c = threadIdx.x % C::kN, rg = threadIdx.x / C::kN;
  if (rg >= nrows) return;
  const unsigned char* krow = smem + stage * C::kStage + C::kKOff + c * C::kKRow;
  const int d_chunks = static_cast<int>((p.head_dim + C::kVec - 1) / C::kVec);  // K is zero past D

  float dot[C::kQkSlots];
#pragma unroll
  for (int s = 0; s < C::kQkSlots; ++s) dot[s] = 0.0f;
#pragma unroll 2
  for (int u = 0; u < d_chunks; ++u) {
    float kf[C::kVec];
    unpack_chunk<T>(*reinterpret_cast<const uint4*>(krow + u * 16), kf);
#pragma unroll
    for (int s = 0; s < C::kQkSlots; ++s) {
      const int r = rg + s * C::kQkGroups;
      if (r < nrows) {  // uniform across the lanes sharing a row group
        const float4* q4 = reinterpret_cast<const float4*>(q_s + r * kHeadDim + u * C::kVec);
#pragma unroll
        for (int e = 0; e < C::kVec / 4; ++e) {
          const float4 qv = q4[e];
          dot[s] = fmaf(qv.x, kf[4 * e], dot[s]);
          dot[s] = fmaf(qv.y, kf[4 * e + 1], dot[s]);
          dot[s] = fmaf(qv.z, kf[4 * e + 2], dot[s]);
          dot[s] = fmaf(qv.w, kf[4 * e + 3], dot[s]);
        }
      }
    }
  }
  const int64_t j = j0 + c;
#pragma unroll
  for (int s = 0; s < C::kQkSlots; ++s) {
    const int r = rg + s * C::kQkGroups;
    if (r >= nrows) continue;
    const float score = a.softcap ? tanhf(dot[s]) * a.cap_mul : dot[s];
    const bool visible = j < key_end && j >= lo_s[r] && j <= hi_s[r];
    p_s[r * C::kPRow + c] = visible ? score : -INFINITY;
  }
}

// Online softmax over the tile, one warp per row: m' = max(m, max_c s_c) (log2 units),
// p_c = 2^(s_c - m'), l' = l * 2^(m - m') + sum_c p_c. The probabilities replace the scores
// in p_s and alpha = 2^(m - m') goes to alpha_s for the P.V step. A row that has seen no
// visible key yet has m' = -inf: it shifts by 0 instead, so alpha = p = 0, never NaN.
template <typename T, int kHeadDim>
__device__ __forceinline__ void tile_softmax(unsigned char* smem, int nrows, float (&m_run)[Cfg<T, kHeadDim>::kSmRows],
                                             float (&l_run)[Cfg<T, kHeadDim>::kSmRows]) {
  using C = Cfg<T, kHeadDim>;
  float* p_s = reinterpret_cast<float*>(smem + C::kPOff);
  float* alpha_s = reinterpret_cast<float*>(smem + C::kAlphaOff);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int k = 0; k < C::kSmRows; ++k) {
    const int r = warp + k * kDecodeWarps;
    if (r >= nrows) break;  // warp-uniform; rows only grow with k
    float* pr = p_s + r * C::kPRow;
    float sv[C::kSmKeys];
    float mx = -INFINITY;
#pragma unroll
    for (int u = 0; u < C::kSmKeys; ++u) {
      const int c = lane + 32 * u;
      sv[u] = c < C::kN ? pr[c] : -INFINITY;
      mx = fmaxf(mx, sv[u]);
    }
    const float m_new = fmaxf(m_run[k], warp_max(mx));
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    float sum = 0.0f;
#pragma unroll
    for (int u = 0; u < C::kSmKeys; ++u) {
      const int c = lane + 32 * u;
      const float prob = exp2f(sv[u] - m_use);
      if (c < C::kN) pr[c] = prob;
      sum += prob;
    }
    const float alpha = exp2f(m_run[k] - m_use);
    l_run[k] = l_run[k] * alpha + warp_sum(sum);
    m_run[k] = m_new;
    if (lane == 0) alpha_s[r] = alpha;
  }
}

// acc[r][:] = alpha_r * acc[r][:] + sum_c p_s[r][c] * V[c][:] over the tile's keys (4 at a time:
// one float4 of probabilities per row, then four V chunks).
template <typename T, int kHeadDim>
__device__ __forceinline__ void tile_pv(const SoftmaxFwdParams& p, unsigned char* smem, int stage, int nrows, int n_keys,
                                        float (&acc)[Cfg<T, kHeadDim>::kPvSlots][Cfg<T, kHeadDim>::kVec]) {
  using C = Cfg<T, kHeadDim>;
  const float* p_s = reinterpret_cast<const float*>(smem + C::kPOff);
  const float* alpha_s = reinterpret_cast<const float*>(smem + C::kAlphaOff);
  const int cg = threadIdx.x % C::kChunksPerRow, rg = threadIdx.x / C::kChunksPerRow;
  if (rg >= nrows || cg * C::kVec >= p.head_dim_v) return;  // no row, or columns past Dv
#pragma unroll
  for (int s = 0; s < C::kPvSlots; ++s) {
    const int r = rg + s * C::kPvGroups;
    const float alpha = r < nrows ? alpha_s[r] : 0.0f;
#pragma unroll
    for (int e = 0; e < C::kVec; ++e) acc[s][e] *= alpha;
  }
  const unsigned char* vcol = smem + stage * C::kStage + C::kVOff + cg * 16;
  const int n4 = (n_keys + 3) & ~3;  // probabilities and V rows past n_keys are exact zeros
  for (int c0 = 0; c0 < n4; c0 += 4) {
    float4 w[C::kPvSlots];
#pragma unroll
    for (int s = 0; s < C::kPvSlots; ++s) {
      const int r = rg + s * C::kPvGroups;
      w[s] = r < nrows ? *reinterpret_cast<const float4*>(p_s + r * C::kPRow + c0) : make_float4(0, 0, 0, 0);
    }
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      float vf[C::kVec];
      unpack_chunk<T>(*reinterpret_cast<const uint4*>(vcol + (c0 + t) * C::kVRow), vf);
#pragma unroll
      for (int s = 0; s < C::kPvSlots; ++s) {
        if (rg + s * C::kPvGroups >= nrows) continue;
        const float pw = t == 0 ? w[s].x : t == 1 ? w[s].y : t == 2 ? w[s].z : w[s].w;
#pragma unroll
        for (int e = 0; e < C::kVec; ++e) acc[s][e] = fmaf(pw, vf[e], acc[s][e]);
      }
    }
  }
}

// Split kernel. CTA (batch b, kv head kvh, split s, row block rb) computes, for each of its rows
// (query head h, query i) and the keys K = chunk s of [key_begin, key_end) that the row sees:
//   m = max_{j in K} s_j,  l = sum_{j in K} 2^(s_j - m),  o = sum_{j in K} 2^(s_j - m) v_j / l
// with s_j in log2 units, and writes o and lse = ln2 * (m + log2 l) (-inf, o = 0 when K is
// empty for the row): to out / lse when there is one split, else to the workspace.
// K/V tiles are double-buffered in shared memory: tile t + 1 is copied (cp.async) while tile t
// is scored and multiplied, and every row of the CTA reads the one copy.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kDecodeThreads, (Cfg<T, kHeadDim>::kMinBlocks))
    decode_split_kernel(const SoftmaxFwdParams p, const DecodeArgs a) {
  using C = Cfg<T, kHeadDim>;
  PYATTN_DYNAMIC_SMEM(__align__(16) unsigned char, smem);
  float* q_s = reinterpret_cast<float*>(smem + C::kQOff);
  int64_t* lo_s = reinterpret_cast<int64_t*>(smem + C::kLoOff);
  int64_t* hi_s = reinterpret_cast<int64_t*>(smem + C::kHiOff);
  float* m_s = reinterpret_cast<float*>(smem + C::kMOff);
  float* l_s = reinterpret_cast<float*>(smem + C::kLOff);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);

  for (int64_t cta = blockIdx.x; cta < a.n_ctas; cta += gridDim.x) {
    const int64_t rb = cta % a.row_blocks, rest = cta / a.row_blocks;
    const int64_t split = rest % a.splits, bkv = rest / a.splits;
    const int64_t b = bkv / p.heads_kv, kvh = bkv % p.heads_kv;
    const int64_t row0 = rb * kDecodeRows;
    const int nrows = static_cast<int>(a.group_rows - row0 < kDecodeRows ? a.group_rows - row0 : kDecodeRows);

    // Keys of this CTA: its split's chunk, narrowed to what its rows can see (same value in
    // every thread, so the tile loop below is uniform).
    int64_t key_lo = a.key_begin + split * a.chunk;
    int64_t key_end = key_lo + a.chunk < a.key_end ? key_lo + a.chunk : a.key_end;
    int64_t seen_lo = INT64_MAX, seen_end = -1;
    for (int r = 0; r < nrows; ++r) {
      const int64_t i = (row0 + r) % p.seq_q, lo = p.key_lo(i), hi = p.key_hi(i);
      if (lo > hi) continue;
      seen_lo = lo < seen_lo ? lo : seen_lo;
      seen_end = hi + 1 > seen_end ? hi + 1 : seen_end;
    }
    key_lo = seen_lo > key_lo ? seen_lo : key_lo;
    key_end = seen_end < key_end ? seen_end : key_end;
    const int64_t n_tiles = key_end > key_lo ? (key_end - key_lo + C::kN - 1) / C::kN : 0;

    // Pre-scaled q rows (zero past D and past the block's rows) and each row's visible keys.
    for (int x = tid; x < kDecodeRows * kHeadDim; x += kDecodeThreads) {
      const int r = x / kHeadDim, d = x % kHeadDim;
      float val = 0.0f;
      if (r < nrows && d < D) {
        const RowId id = row_id(p, a, kvh, row0 + r);
        val = to_float(q[b * p.q_stride[0] + id.h * p.q_stride[1] + id.i * p.q_stride[2] + d * p.q_stride[3]]) *
              a.q_mul;
      }
      q_s[x] = val;
    }
    if (tid < kDecodeRows) {
      const bool live = tid < nrows;
      const int64_t i = live ? row_id(p, a, kvh, row0 + tid).i : 0;
      lo_s[tid] = live ? p.key_lo(i) : 1;  // rows past the block see nothing
      hi_s[tid] = live ? p.key_hi(i) : 0;
    }

    const T* k_bh = k + b * p.k_stride[0] + kvh * p.k_stride[1];
    const T* v_bh = v + b * p.v_stride[0] + kvh * p.v_stride[1];
    float acc[C::kPvSlots][C::kVec];
#pragma unroll
    for (int s = 0; s < C::kPvSlots; ++s)
#pragma unroll
      for (int e = 0; e < C::kVec; ++e) acc[s][e] = 0.0f;
    float m_run[C::kSmRows], l_run[C::kSmRows];
#pragma unroll
    for (int s = 0; s < C::kSmRows; ++s) {
      m_run[s] = -INFINITY;
      l_run[s] = 0.0f;
    }

    if (n_tiles > 0) {
      stage_tile<T, kHeadDim>(p, a, smem, 0, k_bh, v_bh, key_lo, key_end);
      cp_async_commit();
    }
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      const int64_t j0 = key_lo + tile * C::kN;
      const int stage = static_cast<int>(tile & 1);
      cp_async_wait_all();  // this thread's copies of the tile have landed
      // Every thread's copies are visible, q_s is written, and the previous tile's P.V is done
      // with the other stage and with p_s: the next tile may be copied in now.
      __syncthreads();
      if (tile + 1 < n_tiles) {
        stage_tile<T, kHeadDim>(p, a, smem, stage ^ 1, k_bh, v_bh, j0 + C::kN, key_end);
        cp_async_commit();
      }
      tile_scores<T, kHeadDim>(p, a, smem, stage, nrows, j0, key_end);
      __syncthreads();
      tile_softmax<T, kHeadDim>(smem, nrows, m_run, l_run);
      __syncthreads();
      const int64_t left = key_end - j0;
      tile_pv<T, kHeadDim>(p, smem, stage, nrows, static_cast<int>(left < C::kN ? left : C::kN), acc);
    }

    // Row statistics from the softmax warps to the threads that own the output columns.
#pragma unroll
    for (int s = 0; s < C::kSmRows; ++s) {
      const int r = warp + s * kDecodeWarps;
      if (lane == 0) {
        m_s[r] = m_run[s];
        l_s[r] = l_run[s];
      }
    }
    __syncthreads();

    const int cg = tid % C::kChunksPerRow, rg = tid / C::kChunksPerRow;
#pragma unroll
    for (int s = 0; s < C::kPvSlots; ++s) {
      const int r = rg + s * C::kPvGroups;
      if (r >= nrows) continue;
      const float l = l_s[r];
      const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
      const RowId id = row_id(p, a, kvh, row0 + r);
      if (a.splits == 1) {
        T* o = out + b * p.out_stride[0] + id.h * p.out_stride[1] + id.i * p.out_stride[2];
#pragma unroll
        for (int e = 0; e < C::kVec; ++e) {
          const int d = cg * C::kVec + e;
          if (d < Dv) o[d * p.out_stride[3]] = from_float<T>(acc[s][e] * inv_l);
        }
      } else {
        const int64_t row = (b * p.heads_q + id.h) * p.seq_q + id.i;
        float* o = a.ws_out + (split * a.rows_total + row) * Dv;
#pragma unroll
        for (int e = 0; e < C::kVec; ++e) {
          const int d = cg * C::kVec + e;
          if (d < Dv) o[d] = acc[s][e] * inv_l;
        }
      }
    }
    if (tid < nrows) {
      const float l = l_s[tid];
      const float lse = l > 0.0f ? (m_s[tid] + log2f(l)) * kLn2 : -INFINITY;
      const RowId id = row_id(p, a, kvh, row0 + tid);
      if (a.splits == 1) {
        if (p.lse != nullptr) p.lse[b * p.lse_stride[0] + id.h * p.lse_stride[1] + id.i * p.lse_stride[2]] = lse;
      } else {
        a.ws_lse[split * a.rows_total + (b * p.heads_q + id.h) * p.seq_q + id.i] = lse;
      }
    }
    __syncthreads();  // the next CTA of the grid-stride loop rewrites q_s, lo_s, m_s, l_s
  }
}

// Combine kernel, one warp per row (b, h, i) of out: with the splits' lse_s and normalised
// partial outputs o_s,
//   lse = M + log sum_s exp(lse_s - M)   (M = max_s lse_s, 0 when all are -inf)
//   out = sum_s exp(lse_s - lse) o_s     (zeros, lse -inf, when every split is -inf)
// using the same inline steps as the host merge_split_rows (lse_merge.h).
template <typename T>
__global__ void __launch_bounds__(kDecodeCombineWarps * 32)
    decode_combine_kernel(const SoftmaxFwdParams p, const float* ws_out, const float* ws_lse, int splits,
                          int64_t rows) {
  __shared__ float weights[kDecodeCombineWarps][kDecodeMaxSplits];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int Dv = static_cast<int>(p.head_dim_v);
  T* out = static_cast<T*>(p.out);
  for (int64_t row = int64_t(blockIdx.x) * kDecodeCombineWarps + warp; row < rows;
       row += int64_t(gridDim.x) * kDecodeCombineWarps) {
    float mx = -INFINITY;
    for (int s = lane; s < splits; s += 32) mx = fmaxf(mx, ws_lse[s * rows + row]);
    const float shift = lse_merge_shift(warp_max(mx));
    float sum = 0.0f;
    for (int s = lane; s < splits; s += 32) sum += lse_merge_term(ws_lse[s * rows + row], shift);
    const float lse = lse_merge_total(shift, warp_sum(sum));
    for (int s = lane; s < splits; s += 32) weights[warp][s] = lse_merge_weight(ws_lse[s * rows + row], lse);
    __syncwarp();

    const int64_t i = row % p.seq_q, bh = row / p.seq_q, h = bh % p.heads_q, b = bh / p.heads_q;
    T* o = out + b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
    for (int d = lane; d < Dv; d += 32) {
      float acc = 0.0f;
#pragma unroll 4
      for (int s = 0; s < splits; ++s) acc = lse_merge_accumulate(acc, weights[warp][s], ws_out[(s * rows + row) * Dv + d]);
      o[d * p.out_stride[3]] = from_float<T>(acc);
    }
    if (lane == 0 && p.lse != nullptr) p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + i * p.lse_stride[2]] = lse;
    __syncwarp();  // the next row rewrites this warp's weights
  }
}

// 16-byte loads need a 16-byte aligned base, unit innermost stride, and outer strides that
// keep every row start aligned.
template <typename T>
bool can_vector_load(const void* base, const int64_t (&stride)[4]) {
  constexpr int64_t kE = 16 / sizeof(T);
  return stride[3] == 1 && reinterpret_cast<uintptr_t>(base) % 16 == 0 && stride[0] % kE == 0 &&
         stride[1] % kE == 0 && stride[2] % kE == 0;
}

}  // namespace

template <typename T, int kHeadDim>
cudaError_t softmax_decode(const SoftmaxFwdParams& p, const LaunchPlan& plan, float* workspace,
                           cudaStream_t stream) {
  using C = Cfg<T, kHeadDim>;
  if (p.batch <= 0 || p.heads_q <= 0 || p.heads_kv <= 0 || p.seq_q <= 0) return cudaSuccess;
  if (p.seq_q > kDecodeMaxQueries || p.heads_q % p.heads_kv != 0 || p.head_dim > kHeadDim ||
      p.head_dim_v > kHeadDim) {
    return cudaErrorInvalidValue;
  }
  DecodeArgs a;
  a.group = p.heads_q / p.heads_kv;
  a.group_rows = decode_group_rows(p);
  a.row_blocks = decode_row_blocks(p);
  const DecodeKeyRange range = decode_key_range(p);
  a.key_begin = range.begin;
  a.key_end = range.end;
  a.splits = plan.num_splits < 1 ? 1 : plan.num_splits;
  if (a.splits > kDecodeMaxSplits) return cudaErrorInvalidValue;
  // The plan's split count is decode_splits_used(keys, chunk) for the chunk it chose, and that
  // count gives back the same chunk (attention_cuda_decode_plan.h).
  a.chunk = decode_split_chunk(range.end - range.begin, a.splits, C::kN);
  a.n_ctas = p.batch * p.heads_kv * a.row_blocks * a.splits;
  a.rows_total = p.batch * p.heads_q * p.seq_q;
  if (a.splits > 1) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    a.ws_out = workspace;
    a.ws_lse = workspace + int64_t(a.splits) * a.rows_total * p.head_dim_v;
  }
  a.k_vec = can_vector_load<T>(p.k, p.k_stride);
  a.v_vec = can_vector_load<T>(p.v, p.v_stride);
  a.softcap = p.softcap > 0.0f;
  a.q_mul = a.softcap ? p.scale / p.softcap : p.scale * kLog2e;
  a.cap_mul = p.softcap * kLog2e;

  const size_t smem = static_cast<size_t>(C::kSmem);
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(decode_split_kernel<T, kHeadDim>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const unsigned grid = static_cast<unsigned>(a.n_ctas < kMaxGridX ? a.n_ctas : kMaxGridX);
  const auto split_kernel = decode_split_kernel<T, kHeadDim>;
  PYATTN_LAUNCH(split_kernel, grid, kDecodeThreads, smem, stream)(p, a);
  if (a.splits > 1) {
    const int64_t blocks = (a.rows_total + kDecodeCombineWarps - 1) / kDecodeCombineWarps;
    const unsigned cgrid = static_cast<unsigned>(blocks < kMaxGridX ? blocks : kMaxGridX);
    PYATTN_LAUNCH(decode_combine_kernel<T>, cgrid, kDecodeCombineWarps * 32, 0, stream)(p, a.ws_out, a.ws_lse, a.splits,
                                                                                       a.rows_total);
  }
  return cudaGetLastError();
}

#define PYATTN_DECODE_INSTANTIATE(T, D)                                                                    \
  template cudaError_t softmax_decode<T, D>(const SoftmaxFwdParams&, const LaunchPlan&, float*, cudaStream_t);
PYATTN_DECODE_INSTANTIATE(float, 64)
PYATTN_DECODE_INSTANTIATE(float, 128)
PYATTN_DECODE_INSTANTIATE(float, 256)
PYATTN_DECODE_INSTANTIATE(__half, 64)
PYATTN_DECODE_INSTANTIATE(__half, 128)
PYATTN_DECODE_INSTANTIATE(__half, 256)
PYATTN_DECODE_INSTANTIATE(__nv_bfloat16, 64)
PYATTN_DECODE_INSTANTIATE(__nv_bfloat16, 128)
PYATTN_DECODE_INSTANTIATE(__nv_bfloat16, 256)
#undef PYATTN_DECODE_INSTANTIATE

}  // namespace cuda
}  // namespace pyattn
