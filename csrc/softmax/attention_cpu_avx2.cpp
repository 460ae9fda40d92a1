// AVX2 + FMA build of the block kernels (x86-64-v3); chosen at run time when the CPU has it.
#define PYATTN_ISA avx2
#define PYATTN_VEC_BYTES 32
// 3 x 4 accumulators + 1 broadcast, B vectors read as FMA memory operands: 7 loads per 12
// FMAs, and 64-wide blocks split into whole 4-vector columns. Measured on Zen 3 (single thread,
// B=1 H=8 S=2048 D=64): ~7% faster forward than the 6 x 2 tile of the classic AVX2 sgemm.
#define PYATTN_TILE_ROWS 3
#define PYATTN_TILE_VECS 4
// 96 keys a block: S^T = K . QT splits into whole 3-row tiles (64 left one row over), and the
// P . V tiles run 96 deep. Paired A/B on a Zen 4 against 64: +1 to +5% forward.
#define PYATTN_BLOCK_KEYS 96
#include "attention_cpu_kernel.h"
#include "attention_cpu_bwd.h"
