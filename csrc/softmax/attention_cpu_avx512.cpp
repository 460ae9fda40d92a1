// AVX-512 build of the block kernels (x86-64-v4); chosen at run time when the CPU has it.
#define PYATTN_ISA avx512
#define PYATTN_VEC_BYTES 64
#define PYATTN_TILE_ROWS 6  // 6 x 4 accumulators + 4 B vectors + 1 broadcast of 32 zmm
#define PYATTN_TILE_VECS 4
// 192 keys a block: whole 6-row tiles for S^T = K . QT, P . V tiles 192 deep, a third of the
// per-block softmax bookkeeping. Paired A/B on a Zen 4 against 64: +3 to +5% forward (96: +2%).
#define PYATTN_BLOCK_KEYS 192
#include "attention_cpu_kernel.h"
#include "attention_cpu_bwd.h"
