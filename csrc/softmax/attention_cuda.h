// CUDA fused softmax attention forward: plain C++ entry points into attention_cuda.cu, so
// that the pybind11 glue (bindings_cuda.cpp) needs neither nvcc nor CUDA headers.
#pragma once

#include "params.h"

namespace pyattn {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Launches the forward on `stream` (a cudaStream_t) of CUDA device `device`. q, k, v and
// out hold `dtype` elements, lse float32. Returns nullptr once the kernel is queued, or
// a message saying why it could not be (the CUDA error, or an unsupported head size).
const char* softmax_fwd(const SoftmaxFwdParams& p, DType dtype, int device, void* stream);

}  // namespace cuda
}  // namespace pyattn
