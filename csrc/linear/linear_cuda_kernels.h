// The CUDA linear-attention kernel templates the launcher (linear_cuda_launch.cu) calls.
// Explicitly instantiated in their .cu files for T in {float, __half, __nv_bfloat16} and
// kBucket in {64, 128} (the bucket of max(feature_dim, head_dim_v)); runtime flags carry the
// feature map, normalization, decay and states. Each queues its kernels on `stream` and
// returns the launch error; `plan` is what the matching plan_* function returned.
#pragma once

#include <cuda_runtime.h>

#include "../common/cuda_plan.h"
#include "linear_params.h"

namespace pyattn {
namespace cuda {

// Chunked causal forward (linear_cuda_fwd.cu). `workspace`: plan.workspace_floats float32.
template <typename T, int kBucket>
cudaError_t linear_chunk_fwd(const LinearFwdParams& p, const LaunchPlan& plan, float* workspace,
                             cudaStream_t stream);

// Chunked causal backward (linear_cuda_bwd.cu).
template <typename T, int kBucket>
cudaError_t linear_chunk_bwd(const LinearBwdParams& p, const LaunchPlan& plan, float* workspace,
                             cudaStream_t stream);

// Token-by-token forward for short inputs, the decoding step (linear_cuda_decode.cu).
template <typename T, int kBucket>
cudaError_t linear_recurrent_fwd(const LinearFwdParams& p, const LaunchPlan& plan, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyattn
