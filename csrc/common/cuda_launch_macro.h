// The two spellings of CUDA that a host compiler cannot parse, as macros, so the kernel sources
// also compile as plain C++ under the CPU emulation of tests/cuda_emulation
// (-DPYATTN_CUDA_EMULATION), which then runs the real launch functions and kernels.
// Under nvcc they expand to exactly the code written out before: a kernel launch with triple
// chevrons and the declaration of the dynamic shared memory.
//
//   PYATTN_LAUNCH(kernel, grid, block, smem_bytes, stream)(args...);
//   PYATTN_DYNAMIC_SMEM(__align__(16) unsigned char, smem);  // extern __shared__ ... smem[]
//
// `kernel` must be a single macro argument: name a template instantiation through a variable
// (const auto kernel = k<T, kD>;) rather than with a bare comma.
#pragma once

#if defined(PYATTN_CUDA_EMULATION)
#include <pyattn_emu_ptx.h>  // the emulator's runtime and host versions of the inline PTX

#define PYATTN_LAUNCH(kernel, grid, block, smem, stream) ::pyattn_emu::launch(kernel, grid, block, smem, stream)
#define PYATTN_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::pyattn_emu::t_dynamic_smem)
#else
#define PYATTN_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define PYATTN_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif
