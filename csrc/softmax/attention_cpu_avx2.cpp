// AVX2 + FMA build of the block kernel (x86-64-v3); chosen at run time when the CPU has it.
#define PYATTN_ISA avx2
#define PYATTN_VEC_BYTES 32
#define PYATTN_TILE_ROWS 6  // 6 x 2 accumulators + 2 B vectors + 1 broadcast of 16 ymm
#define PYATTN_TILE_VECS 2
#include "attention_cpu_kernel.h"

namespace pyattn {
namespace cpu {

const IsaKernel& softmax_fwd_kernel_avx2() {
  static constexpr IsaKernel kernel{"avx2", avx2::kBlockRows, &avx2::scratch_floats_fn,
                                    &avx2::run_block};
  return kernel;
}

}  // namespace cpu
}  // namespace pyattn
