// Portable build of the linear attention head kernels: 128-bit vectors (SSE2 on x86-64,
// NEON on aarch64, which has 32 vector registers, hence the wider tile there).
#define PYATTN_ISA lin_base
#define PYATTN_VEC_BYTES 16
#define PYATTN_TILE_ROWS 6
#if defined(__aarch64__)
#define PYATTN_TILE_VECS 4
#else
#define PYATTN_TILE_VECS 2
#endif
#define PYATTN_LINEAR_NAME "base"
#define PYATTN_LINEAR_TABLE linear_kernel_base
#include "linear_cpu_kernel.h"
