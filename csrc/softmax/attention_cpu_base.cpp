// Portable build of the block kernels: 128-bit vectors, i.e. SSE2 on any x86-64 and NEON
// on aarch64 (which has 32 vector registers, hence the wider tile there).
#define PYATTN_ISA base
#define PYATTN_VEC_BYTES 16
#define PYATTN_TILE_ROWS 6
#if defined(__aarch64__)
#define PYATTN_TILE_VECS 4
#else
#define PYATTN_TILE_VECS 2
#endif
#include "attention_cpu_kernel.h"
#include "attention_cpu_bwd.h"
