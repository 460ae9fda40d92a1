// AVX-512 build of the linear attention head kernels; chosen at run time when the CPU has it.
#define PYATTN_ISA lin_avx512
#define PYATTN_VEC_BYTES 64
#define PYATTN_TILE_ROWS 6  // 6 x 4 accumulators + 4 B vectors + 1 broadcast of 32 zmm
#define PYATTN_TILE_VECS 4
#define PYATTN_LINEAR_NAME "avx512"
#define PYATTN_LINEAR_TABLE linear_kernel_avx512
#include "linear_cpu_kernel.h"
