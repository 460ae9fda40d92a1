// AVX2 + FMA build of the block kernels (x86-64-v3); chosen at run time when the CPU has it.
#define PYATTN_ISA avx2
#define PYATTN_VEC_BYTES 32
#define PYATTN_TILE_ROWS 6  // 6 x 2 accumulators + 2 B vectors + 1 broadcast of 16 ymm
#define PYATTN_TILE_VECS 2
#include "attention_cpu_kernel.h"
#include "attention_cpu_bwd.h"
