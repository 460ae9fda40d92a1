// The CUDA softmax-attention kernel templates the launcher (attention_cuda_launch.cu) calls.
// Each is explicitly instantiated in its own .cu file for the dtypes and head-dim buckets
// listed, so the launcher's switch tree is the only place that maps runtime values onto
// template arguments. Every function queues its kernels on `stream` and returns the launch
// error (cudaSuccess once queued); `plan` is what the matching plan_* function returned.
#pragma once

#include <cuda_runtime.h>

#include "../common/cuda_plan.h"
#include "params.h"

namespace pyattn {
namespace cuda {

// Tensor-core forward (attention_cuda_fwd.cu): T in {__half, __nv_bfloat16},
// kHeadDim in {64, 128, 256} (the bucket of max(head_dim, head_dim_v)).
template <typename T, int kHeadDim>
cudaError_t softmax_fwd_mma(const SoftmaxFwdParams& p, const LaunchPlan& plan, cudaStream_t stream);

// Tensor-core backward (attention_cuda_bwd.cu), same instantiations. `workspace` holds
// plan.workspace_floats float32 values (dq accumulator, row terms), contents undefined on entry.
template <typename T, int kHeadDim>
cudaError_t softmax_bwd_mma(const SoftmaxBwdParams& p, const LaunchPlan& plan, float* workspace,
                            cudaStream_t stream);

// Split-KV decoding forward for few queries over many keys (attention_cuda_decode.cu):
// T in {float, __half, __nv_bfloat16}, kHeadDim in {64, 128, 256}. `workspace`: the
// plan's partial outputs and lse (unused when plan.num_splits == 1).
template <typename T, int kHeadDim>
cudaError_t softmax_decode(const SoftmaxFwdParams& p, const LaunchPlan& plan, float* workspace,
                           cudaStream_t stream);

// Scalar forward for any head dim and float32 (attention_cuda_simt.cu): T in {float, __half,
// __nv_bfloat16}.
template <typename T>
cudaError_t softmax_fwd_simt(const SoftmaxFwdParams& p, const LaunchPlan& plan, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyattn
