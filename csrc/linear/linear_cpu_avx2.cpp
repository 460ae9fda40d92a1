// AVX2 + FMA build of the linear attention head kernels; chosen at run time when the CPU has it.
#define PYATTN_ISA lin_avx2
#define PYATTN_VEC_BYTES 32
#define PYATTN_TILE_ROWS 6  // 6 x 2 accumulators + 2 B vectors + 1 broadcast of 16 ymm
#define PYATTN_TILE_VECS 2
#define PYATTN_LINEAR_NAME "avx2"
#define PYATTN_LINEAR_TABLE linear_kernel_avx2
#include "linear_cpu_kernel.h"
