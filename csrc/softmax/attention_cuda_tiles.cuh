// Shared-memory tile helpers of the tensor-core softmax attention kernels
// (attention_cuda_fwd.cu, attention_cuda_bwd.cu): global -> shared tile loads with a
// cp.async fast path and a masked scalar fallback for any strides, ldmatrix fragment loads
// from padded tiles, and masked fragment stores.
//
// A shared tile of R rows and C (multiple of 16) columns of 16-bit values is stored
// row-major with a row pitch of C + 8 elements: the 16 extra bytes shift consecutive rows by
// 4 banks, so the 8 row addresses of one ldmatrix (and the 16-byte cp.async writes) hit 8
// distinct groups of 4 banks, without a swizzle.
#pragma once

#include <cstdint>

#include "../common/cuda_mma.cuh"

namespace pyattn {
namespace cuda {
namespace tiles {

template <int kCols>
struct Pitch {
  static_assert(kCols % 16 == 0, "tiles are whole 16-column fragments");
  static constexpr int kValue = kCols + 8;  // elements per stored row
};

// Whether rows of a strided (.., rows, cols) tensor can be moved as 16-byte chunks: unit
// innermost stride and every row start 16-byte aligned (a property of the base pointer and
// the outer strides, so one flag per tensor and launch).
inline bool rows_16b_aligned(const void* base, const int64_t (&stride)[4]) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && stride[3] == 1 && stride[0] % 8 == 0 &&
         stride[1] % 8 == 0 && stride[2] % 8 == 0;
}

// Whether element pairs (2c, 2c + 1) of a row can be stored as one 32-bit word.
inline bool rows_4b_aligned(const void* base, const int64_t (&stride)[4]) {
  return reinterpret_cast<uintptr_t>(base) % 4 == 0 && stride[3] == 1 && stride[0] % 2 == 0 &&
         stride[1] % 2 == 0 && stride[2] % 2 == 0;
}

#if defined(PYATTN_MMA_DEVICE_CODE)

// Loads rows [0, kRows) x columns [0, kCols) of the matrix at g (row stride rs, column
// stride cs, elements) into the padded shared tile s; rows >= rows_valid and columns >=
// cols_valid become zeros. vec: the rows_16b_aligned property (then cs == 1). The vector path
// is asynchronous (cp.async, the caller commits and waits); the scalar path stores directly.
template <typename T, int kRows, int kCols, int kThreads>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t rs, int64_t cs, int rows_valid,
                                          int cols_valid, bool vec) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kPitch = Pitch<kCols>::kValue;
  if (vec) {
    // Each thread owns one 16-byte column chunk and walks down the rows with a running
    // pointer: per-chunk 64-bit offsets precomputed for every row would be loop-invariant
    // across the callers' tile loops and pin dozens of registers.
    static_assert(kThreads % kChunksPerRow == 0 && kRows % (kThreads / kChunksPerRow) == 0, "tile shape");
    constexpr int kRowStep = kThreads / kChunksPerRow;
    const int col = (threadIdx.x % kChunksPerRow) * 8, r0 = threadIdx.x / kChunksPerRow;
    int n = cols_valid - col;
    n = n < 0 ? 0 : (n > 8 ? 8 : n);
    const T* src = g + r0 * rs + col;
    const uint32_t dst = mma::smem_addr(s + r0 * kPitch + col);
#pragma unroll
    for (int i = 0; i < kRows / kRowStep; ++i) {
      const int bytes = r0 + i * kRowStep < rows_valid ? 2 * n : 0;
      mma::cp_async_16(dst + 2u * (i * kRowStep * kPitch), bytes > 0 ? src : g, bytes);
      src += kRowStep * rs;
    }
  } else {
    for (int c = threadIdx.x; c < kRows * kChunksPerRow; c += kThreads) {
      const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      union {
        uint4 u;
        T e[8];
      } chunk;
      chunk.u = make_uint4(0, 0, 0, 0);
      if (r < rows_valid) {
        const T* row = g + r * rs;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (col + j < cols_valid) chunk.e[j] = row[(col + j) * cs];
        }
      }
      *reinterpret_cast<uint4*>(s + r * kPitch + col) = chunk.u;
    }
  }
}

// Byte address of element (row, col) of a padded tile, for ldmatrix.
template <int kCols>
__device__ __forceinline__ uint32_t tile_addr(uint32_t base, int row, int col) {
  return base + 2u * static_cast<uint32_t>(row * Pitch<kCols>::kValue + col);
}

// A fragment (16 x 16) at (row0, col0) of a tile stored [m][k].
template <int kCols>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], uint32_t base, int row0, int col0, int lane) {
  mma::ldsm_x4(a, tile_addr<kCols>(base, row0 + mma::ldsm_a_row(lane), col0 + mma::ldsm_a_col(lane)));
}

// A fragment (16 m x 16 k) whose tile is stored [k][m]: k0 is the stored row, m0 the column.
template <int kCols>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], uint32_t base, int k0, int m0, int lane) {
  mma::ldsm_x4_trans(a, tile_addr<kCols>(base, k0 + mma::ldsm_at_row(lane), m0 + mma::ldsm_at_col(lane)));
}

// B fragments of n-tiles n0 and n0 + 8 (k from k0) of a tile stored [n][k]:
// b[0], b[1] for the first n-tile, b[2], b[3] for the second.
template <int kCols>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], uint32_t base, int n0, int k0, int lane) {
  mma::ldsm_x4(b, tile_addr<kCols>(base, n0 + mma::ldsm_bn_row(lane), k0 + mma::ldsm_bn_col(lane)));
}

// B fragments of n-tiles n0 and n0 + 8 (k from k0) of a tile stored [k][n].
template <int kCols>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], uint32_t base, int k0, int n0, int lane) {
  mma::ldsm_x4_trans(b, tile_addr<kCols>(base, k0 + mma::ldsm_bk_row(lane), n0 + mma::ldsm_bk_col(lane)));
}

// The C fragments c[2 kk], c[2 kk + 1] (columns 16 kk .. 16 kk + 15 of a 16-row accumulator)
// as the A fragment of the next product, whose k runs over those columns: the C layout of two
// adjacent n-tiles is exactly the A layout of one k-chunk.
template <typename T, int kTiles>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c)[kTiles][4], int kk) {
  a[0] = mma::pack2<T>(c[2 * kk][0], c[2 * kk][1]);
  a[1] = mma::pack2<T>(c[2 * kk][2], c[2 * kk][3]);
  a[2] = mma::pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = mma::pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// acc (16 rows x kCols) += X Y for one warp: X (16 rows x kK) in C-fragment registers, reused as
// A operands (c_to_a), and Y a shared tile stored [k][n] with kCols columns, read through
// transposed ldmatrix. 16-column chunks at or past `cols` are skipped. The forward's O += P V and
// the backward's dV += P^T dO and dK += dS^T Q.
template <typename T, int kCols, int kK>
__device__ __forceinline__ void accumulate_c_kn(float (&acc)[kCols / 8][4], const float (&x)[kK / 8][4],
                                                uint32_t y_base, int lane, int cols) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t xa[4];
    c_to_a<T>(xa, x, kk);
#pragma unroll
    for (int dp = 0; dp < kCols / 16; ++dp) {
      if (dp * 16 < cols) {
        uint32_t yb[4];
        load_b_kn<kCols>(yb, y_base, kk * 16, dp * 16, lane);
        mma::mma_16816<T>(acc[2 * dp], xa, yb[0], yb[1]);
        mma::mma_16816<T>(acc[2 * dp + 1], xa, yb[2], yb[3]);
      }
    }
  }
}

// Stores a warp's 16-row accumulator (n-tiles of 8 columns) scaled by row_mul[0] (row g) and
// row_mul[1] (row g + 8) to rows row0.., columns 0.. of a strided tensor, skipping rows >=
// rows_valid and columns >= cols_valid. pair: rows_4b_aligned (then cs == 1).
template <typename T, int kTiles>
__device__ __forceinline__ void store_c(T* g, int64_t rs, int64_t cs, const float (&c)[kTiles][4],
                                        const float (&row_mul)[2], int row0, int rows_valid, int cols_valid,
                                        bool pair, int lane) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + mma::c_row(lane, 2 * half);
    if (r >= rows_valid) continue;
    T* row = g + r * rs;
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) {
      const int col = 8 * nt + mma::c_col(lane, 0);
      if (col >= cols_valid) continue;
      const float x0 = c[nt][2 * half] * row_mul[half], x1 = c[nt][2 * half + 1] * row_mul[half];
      if (pair && col + 1 < cols_valid) {
        *reinterpret_cast<uint32_t*>(row + col) = mma::pack2<T>(x0, x1);
      } else {
        row[col * cs] = mma::from_float<T>(x0);
        if (col + 1 < cols_valid) row[(col + 1) * cs] = mma::from_float<T>(x1);
      }
    }
  }
}

#endif  // PYATTN_MMA_DEVICE_CODE

}  // namespace tiles
}  // namespace cuda
}  // namespace pyattn
