// Which CUDA kernel a call runs, and how: the top of the CUDA module's switch tree, in plain
// C++. pyattn.dispatch.cuda asks these same functions (through pyattn._cuda) whether a call
// can run, and the launcher (cuda_launch.cu) runs exactly the plan they return.
#pragma once

#include <algorithm>

#include "common/cuda_plan.h"
#include "linear/linear_cuda_plan.h"
#include "linear/linear_params.h"
#include "softmax/attention_cuda_decode_plan.h"
#include "softmax/attention_cuda_mma_plan.h"
#include "softmax/attention_cuda_simt_plan.h"
#include "softmax/params.h"

namespace pyattn {
namespace cuda {

// Few queries over the keys: split-KV decoding (memory-bound, needs the keys spread over the
// GPU). Otherwise the tensor-core kernel for 16-bit inputs; float32 runs the scalar kernel.
inline LaunchPlan plan_softmax_fwd(const SoftmaxFwdParams& p, DType dtype, const DeviceInfo& dev) {
  if (p.seq_q <= kDecodeMaxQueries) return plan_softmax_decode(p, dtype, dev);
  if (dtype != DType::kFloat32) return plan_softmax_fwd_mma(p, dtype, dev);
  return plan_softmax_fwd_simt(p, dtype, dev);
}

inline LaunchPlan plan_softmax_bwd(const SoftmaxBwdParams& p, DType dtype, const DeviceInfo& dev) {
  return plan_softmax_bwd_mma(p, dtype, dev);
}

// Up to kRecurrentMaxSeq tokens (the decoding step) step through the recurrence; longer inputs
// run chunked.
inline LaunchPlan plan_linear_fwd(const LinearFwdParams& p, DType dtype, const DeviceInfo& dev) {
  if (p.seq <= kRecurrentMaxSeq) return plan_linear_recurrent_fwd(p, dtype, dev);
  return plan_linear_chunk_fwd(p, dtype, dev);
}

inline LaunchPlan plan_linear_bwd(const LinearBwdParams& p, DType dtype, const DeviceInfo& dev) {
  return plan_linear_chunk_bwd(p, dtype, dev);
}

}  // namespace cuda
}  // namespace pyattn
