// Host versions of the inline-PTX instructions of pyattn's kernels, for the CPU emulation:
// ldmatrix (.x1/.x2/.x4, .trans), mma.sync.m16n8k16.row.col.f32.{f16,bf16}, cp.async 16-byte
// with zero-fill, ex2.approx.ftz. The fragment layouts are written out here from the PTX ISA
// (sections "Matrix Fragments for mma.m16n8k16" and "ldmatrix"), independently of the index
// helpers in csrc/common/cuda_mma.cuh, so the emulation checks those helpers too.
//
// ldmatrix and mma are warp-collective: they go through the warp rendezvous of
// cuda_runtime.h. Shared addresses are offsets into the CTA's dynamic shared memory, checked
// against its size and the instructions' alignment rules.
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace pyattn_emu {

// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16: lanes 8j..8j+7 give the row
// addresses (16 bytes each) of matrix j; register j of lane l receives the two 16-bit elements
// (row l/4, columns 2(l%4), 2(l%4)+1) of matrix j, or with .trans those of its transpose
// (rows 2(l%4), 2(l%4)+1 of column l/4). The lower half holds the first element.
template <int kMatrices>
void ldmatrix(uint32_t (&r)[kMatrices], uint32_t addr, bool trans) {
  struct Closure {
    bool trans;
  } c{trans};
  warp_collective(
      kLdmatrix, 0xffffffffu, &addr, sizeof(addr), r, sizeof(r),
      [](void* p, const Slots& ins, Slots& outs, unsigned) {
        const bool tr = static_cast<Closure*>(p)->trans;
        uint16_t m[kMatrices][8][8] = {};
        for (int j = 0; j < kMatrices; ++j) {
          for (int row = 0; row < 8; ++row) {
            uint32_t a;
            std::memcpy(&a, ins[8 * j + row], 4);
            if (a % 16 != 0) fail("ldmatrix: row address not 16-byte aligned");
            const unsigned char* src = shared_pointer(a, 16, "ldmatrix");
            if (src != nullptr) std::memcpy(m[j][row], src, 16);
          }
        }
        for (int l = 0; l < 32; ++l) {
          const int g = l / 4, t = l % 4;
          uint32_t regs[kMatrices];
          for (int j = 0; j < kMatrices; ++j) {
            const uint16_t lo = tr ? m[j][2 * t][g] : m[j][g][2 * t];
            const uint16_t hi = tr ? m[j][2 * t + 1][g] : m[j][g][2 * t + 1];
            regs[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
          }
          std::memcpy(outs[l], regs, sizeof(regs));
        }
      },
      &c);
}

inline float mma_input(uint16_t bits, __half) { return half_bits_to_float(bits); }
inline float mma_input(uint16_t bits, __nv_bfloat16) { return bf16_bits_to_float(bits); }

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, D = A B + C, with the
// PTX ISA fragments (group = lane / 4, tig = lane % 4; element i of a thread's fragment sits
// in register i / 2, half i % 2):
//   A a_i: row group + 8 for i in {2,3,6,7} (else group), col 2 tig + (i & 1) + 8 (i >= 4)
//   B b_i: row 2 tig + (i & 1) + 8 (i >= 2), col group
//   C c_i: row group + 8 (i >= 2), col 2 tig + (i & 1)
// The 16-bit products are exact in double; the sum is rounded once to float32 (the tensor
// cores' internal rounding differs in the last bits, which no test may depend on).
template <typename T>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  struct In {
    uint32_t a[4], b[2];
    float c[4];
  } in{{a[0], a[1], a[2], a[3]}, {b0, b1}, {c[0], c[1], c[2], c[3]}};
  warp_collective(
      kMma, 0xffffffffu, &in, sizeof(in), c, sizeof(c),
      [](void*, const Slots& ins, Slots& outs, unsigned) {
        double A[16][16], B[16][8], C[16][8];
        for (int l = 0; l < 32; ++l) {
          In f;
          std::memcpy(&f, ins[l], sizeof(In));
          const int group = l / 4, tig = l % 4;
          for (int i = 0; i < 8; ++i) {
            const uint16_t bits = static_cast<uint16_t>(f.a[i / 2] >> (16 * (i % 2)));
            const int row = group + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0);
            const int col = 2 * tig + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = mma_input(bits, T());
          }
          for (int i = 0; i < 4; ++i) {
            const uint16_t bits = static_cast<uint16_t>(f.b[i / 2] >> (16 * (i % 2)));
            B[2 * tig + (i & 1) + (i >= 2 ? 8 : 0)][group] = mma_input(bits, T());
            C[group + (i >= 2 ? 8 : 0)][2 * tig + (i & 1)] = f.c[i];
          }
        }
        for (int l = 0; l < 32; ++l) {
          const int group = l / 4, tig = l % 4;
          float d[4];
          for (int i = 0; i < 4; ++i) {
            const int row = group + (i >= 2 ? 8 : 0), col = 2 * tig + (i & 1);
            double s = C[row][col];
            for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
            d[i] = static_cast<float>(s);
          }
          std::memcpy(outs[l], d, sizeof(d));
        }
      },
      nullptr);
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: reads src_bytes (0..16) and
// zero-fills the rest of the 16. The copy is queued in the issuing thread and carried out as
// late as the hardware may: when cp.async.wait_group retires its group (emu_runtime.cpp), so
// a read of the tile before the wait (and the barrier after it) sees stale shared memory.
inline void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async: src-size outside 0..16");
  if (dst % 16 != 0) fail("cp.async: shared address not 16-byte aligned");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async: global address not 16-byte aligned");
  unsigned char* d = shared_pointer(dst, 16, "cp.async");
  if (d != nullptr) cp_async_queue(d, src, src_bytes);
}

// ex2.approx.ftz.f32: 2^x with subnormal inputs and results flushed to zero.
inline float ex2_approx_ftz(float x) {
  if (fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
  const float y = exp2f(x);
  return fpclassify(y) == FP_SUBNORMAL ? copysignf(0.0f, y) : y;
}

}  // namespace pyattn_emu
