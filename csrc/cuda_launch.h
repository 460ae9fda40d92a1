// Entry points of the CUDA module, in plain C++ so that the pybind11 glue (bindings_cuda.cpp)
// needs neither nvcc nor CUDA headers. Each plans the call (cuda_plans.h) for `dev`, checks the
// plan and the caller's workspace, and queues the plan's kernels on `stream` (a cudaStream_t)
// of CUDA device `device`. Returns nullptr once queued, or a message saying why nothing was.
#pragma once

#include <cstdint>

#include "common/cuda_plan.h"
#include "linear/linear_params.h"
#include "softmax/params.h"

namespace pyattn {
namespace cuda {

// Caller-owned float32 scratch of at least the plan's workspace_floats.
struct Workspace {
  float* data = nullptr;
  int64_t floats = 0;
};

const char* softmax_fwd(const SoftmaxFwdParams& p, DType dtype, const DeviceInfo& dev, int device,
                        void* stream, Workspace workspace);
const char* softmax_bwd(const SoftmaxBwdParams& p, DType dtype, const DeviceInfo& dev, int device,
                        void* stream, Workspace workspace);
const char* linear_fwd(const LinearFwdParams& p, DType dtype, const DeviceInfo& dev, int device,
                       void* stream, Workspace workspace);
const char* linear_bwd(const LinearBwdParams& p, DType dtype, const DeviceInfo& dev, int device,
                       void* stream, Workspace workspace);

}  // namespace cuda
}  // namespace pyattn
