// Thin device wrappers over the sm80+ warp-level tensor-core instructions the attention
// kernels use (mma.sync m16n8k16 with float32 accumulation, ldmatrix, cp.async), plus the
// fragment index math of those instructions as plain __host__ __device__ functions.
//
// The index helpers follow the PTX ISA's fragment layouts; they are kept free of CUDA
// intrinsics (and compile with a host C++ compiler when __CUDACC__ is not defined) so a
// host program can emulate one warp and check them against a plain matmul. Under the CPU
// emulation (PYATTN_CUDA_EMULATION, tests/cuda_emulation) the instructions are the emulator's
// host versions, written from the PTX ISA independently of these helpers.
//
// Conventions (g = lane / 4, t = lane % 4):
//   A (16 x 16, row-major), 4 registers of 2 elements: reg r, half h holds
//     A[g + 8 * (r & 1)][2 t + h + 8 * (r >> 1)]
//   B (16 x 8, "col"), 2 registers: reg r, half h holds B[2 t + h + 8 r][g]
//   C (16 x 8, float32), 4 floats: element e holds C[g + 8 * (e >> 1)][2 t + (e & 1)]
// The lower 16 bits of a register hold the element of lower column (A) / row (B) index.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(PYATTN_CUDA_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_elementwise.cuh"
#define PYATTN_MMA_HD __host__ __device__ __forceinline__
#define PYATTN_MMA_DEVICE_CODE 1
#if defined(PYATTN_CUDA_EMULATION)
#include <pyattn_emu_ptx.h>
#endif
#else
#define PYATTN_MMA_HD inline
#endif

namespace pyattn {
namespace cuda {
namespace mma {

// ---------------------------------------------------------------- fragment coordinates

PYATTN_MMA_HD int a_row(int lane, int reg) { return (lane >> 2) + 8 * (reg & 1); }
PYATTN_MMA_HD int a_col(int lane, int reg, int half) { return 2 * (lane & 3) + half + 8 * (reg >> 1); }
PYATTN_MMA_HD int b_k(int lane, int reg, int half) { return 2 * (lane & 3) + half + 8 * reg; }
PYATTN_MMA_HD int b_n(int lane) { return lane >> 2; }
PYATTN_MMA_HD int c_row(int lane, int e) { return (lane >> 2) + 8 * (e >> 1); }
PYATTN_MMA_HD int c_col(int lane, int e) { return 2 * (lane & 3) + (e & 1); }

// ldmatrix .x4: lanes 8j..8j+7 address the 8 rows of matrix j, and register j of lane l
// receives row l / 4, columns 2 (l % 4) + {0, 1} of matrix j (.trans: the transpose, i.e.
// rows 2 (l % 4) + {0, 1}, column l / 4). The helpers below give the (row, col) of the
// stored tile each lane addresses, so that the four registers come out as named.

// A fragment of a 16 x 16 tile stored row-major [m][k] (non-transposed ldmatrix):
// registers a0..a3 directly.
PYATTN_MMA_HD int ldsm_a_row(int lane) { return (lane & 7) + 8 * ((lane >> 3) & 1); }
PYATTN_MMA_HD int ldsm_a_col(int lane) { return 8 * (lane >> 4); }

// A fragment of a 16 x 16 tile stored transposed, [k][m] (ldmatrix .trans): a0..a3.
// Returns the stored row (k) and column (m).
PYATTN_MMA_HD int ldsm_at_row(int lane) { return (lane & 7) + 8 * (lane >> 4); }
PYATTN_MMA_HD int ldsm_at_col(int lane) { return 8 * ((lane >> 3) & 1); }

// B fragments of two adjacent n-tiles (16 n x 16 k) stored [n][k] (non-transposed):
// registers {b0, b1} of n-tile 0, then {b0, b1} of n-tile 1. Returns stored row (n), col (k).
PYATTN_MMA_HD int ldsm_bn_row(int lane) { return (lane & 7) + 8 * (lane >> 4); }
PYATTN_MMA_HD int ldsm_bn_col(int lane) { return 8 * ((lane >> 3) & 1); }

// B fragments of two adjacent n-tiles stored [k][n] (ldmatrix .trans): {b0, b1} of n-tile 0,
// then of n-tile 1. Returns stored row (k), col (n).
PYATTN_MMA_HD int ldsm_bk_row(int lane) { return (lane & 7) + 8 * ((lane >> 3) & 1); }
PYATTN_MMA_HD int ldsm_bk_col(int lane) { return 8 * (lane >> 4); }

#if defined(PYATTN_MMA_DEVICE_CODE)

// ---------------------------------------------------------------- instructions

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(PYATTN_CUDA_EMULATION)
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) { pyattn_emu::ldmatrix<4>(r, addr, false); }
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  pyattn_emu::ldmatrix<4>(r, addr, true);
}
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], uint32_t addr) { pyattn_emu::ldmatrix<2>(r, addr, false); }
__device__ __forceinline__ void ldsm_x2_trans(uint32_t (&r)[2], uint32_t addr) {
  pyattn_emu::ldmatrix<2>(r, addr, true);
}
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  pyattn_emu::mma_m16n8k16<T>(c, a, b0, b1);
}
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  pyattn_emu::cp_async_16(dst, src, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { pyattn_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  pyattn_emu::cp_async_wait(N);
}
#else
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// .x2: lanes 0..15 address the rows of two matrices (the other lanes' addresses are ignored
// but must be valid shared addresses).
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x2_trans(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

// D = A B + C, 16 x 8 x 16, float32 accumulation in place.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte global -> shared copy; only the first src_bytes (0..16) are read, the rest of the
// 16 bytes is zero-filled (src_bytes = 0 writes zeros and reads nothing).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif  // PYATTN_CUDA_EMULATION

// ---------------------------------------------------------------- conversions

// Two floats into one register of two 16-bit values, `lo` in the lower half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

using ::pyattn::cuda::from_float;  // cuda_elementwise.cuh
using ::pyattn::cuda::to_float;

// ---------------------------------------------------------------- quad reductions

// A row of a C fragment is spread over the 4 lanes of a quad (same g): reduce over them.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

#endif  // PYATTN_MMA_DEVICE_CODE

}  // namespace mma
}  // namespace cuda
}  // namespace pyattn
