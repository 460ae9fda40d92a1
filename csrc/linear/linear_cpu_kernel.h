// The table of one instruction set's linear attention head kernels. The including
// linear_cpu_<isa>.cpp defines PYATTN_ISA (a namespace of its own, lin_<isa>, so that no
// inline function is shared with the softmax kernels' TUs), PYATTN_VEC_BYTES,
// PYATTN_TILE_ROWS, PYATTN_TILE_VECS, PYATTN_LINEAR_NAME and PYATTN_LINEAR_TABLE.
#pragma once

#include "linear_cpu_bwd.h"

namespace pyattn {
namespace cpu {

const LinearIsaKernel& PYATTN_LINEAR_TABLE() {
  using namespace PYATTN_ISA;
  static constexpr LinearIsaKernel kernel{PYATTN_LINEAR_NAME, &fwd_scratch_floats, &fwd_head,
                                          &bwd_scratch_floats, &bwd_head,
                                          &store_rows};
  return kernel;
}

}  // namespace cpu
}  // namespace pyattn
