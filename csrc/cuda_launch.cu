// The CUDA module's one launcher: plan (cuda_plans.h) -> checks -> the switch tree from the
// plan's kernel family, dtype and head-dim bucket onto the template instantiations of
// csrc/softmax/attention_cuda_*.cu and csrc/linear/linear_cuda_*.cu. Every runtime value that
// becomes a template argument becomes one here, and nowhere else.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "cuda_launch.h"
#include "cuda_plans.h"
#include "linear/linear_cuda_kernels.h"
#include "softmax/attention_cuda_kernels.h"

namespace pyattn {
namespace cuda {
namespace {

// Calls fn(T{}) with T the element type of `dtype`.
template <typename Fn>
cudaError_t with_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat16: return fn(__half{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Calls fn(std::integral_constant<int, B>{}) for the plan's head-dim bucket B in kBuckets.
template <int... kBuckets, typename Fn>
cudaError_t with_bucket(int bucket, Fn&& fn) {
  cudaError_t err = cudaErrorInvalidValue;
  ((bucket == kBuckets ? (err = fn(std::integral_constant<int, kBuckets>{}), true) : false) || ...);
  return err;
}

// Switches to `device` for the duration of a launch (kernels go to the current device).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    error_ = cudaGetDevice(&previous_);
    if (error_ == cudaSuccess && previous_ != device_) error_ = cudaSetDevice(device_);
  }
  ~DeviceGuard() {
    if (error_ == cudaSuccess && previous_ != device_) cudaSetDevice(previous_);
  }
  cudaError_t error() const { return error_; }

 private:
  int device_, previous_ = -1;
  cudaError_t error_;
};

// The message a failed call returns; kept per thread so the pointer outlives the call.
const char* failure(const std::string& what) {
  thread_local std::string message;
  message = what;
  return message.c_str();
}

// Runs `launch` for a checked plan: reports the plan's error or a short workspace, skips
// empty grids, and turns the CUDA error into a message.
template <typename Launch>
const char* run(const LaunchPlan& plan, int device, Workspace workspace, Launch&& launch) {
  if (!plan.ok()) return failure(plan.error);
  if (workspace.floats < plan.workspace_floats) {
    return failure(plan.kernel + " needs a workspace of " + std::to_string(plan.workspace_floats) +
                   " floats, got " + std::to_string(workspace.floats));
  }
  if (plan.grid[0] <= 0) return nullptr;  // nothing to compute
  DeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return cudaGetErrorString(guard.error());
  const cudaError_t err = launch();
  return err == cudaSuccess ? nullptr : failure(plan.kernel + ": " + cudaGetErrorString(err));
}

}  // namespace

const char* softmax_fwd(const SoftmaxFwdParams& p, DType dtype, const DeviceInfo& dev, int device,
                        void* stream, Workspace ws) {
  const LaunchPlan plan = plan_softmax_fwd(p, dtype, dev);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return run(plan, device, ws, [&]() -> cudaError_t {
    return with_dtype(dtype, [&](auto t) -> cudaError_t {
      using T = decltype(t);
      if (plan.kernel == "softmax_fwd_simt") return softmax_fwd_simt<T>(p, plan, s);
      return with_bucket<64, 128, 256>(plan.head_dim_bucket, [&](auto bucket) -> cudaError_t {
        constexpr int kD = decltype(bucket)::value;
        if (plan.kernel == "softmax_decode") return softmax_decode<T, kD>(p, plan, ws.data, s);
        if constexpr (!std::is_same<T, float>::value) {
          if (plan.kernel == "softmax_fwd_mma") return softmax_fwd_mma<T, kD>(p, plan, s);
        }
        return cudaErrorInvalidValue;
      });
    });
  });
}

const char* softmax_bwd(const SoftmaxBwdParams& p, DType dtype, const DeviceInfo& dev, int device,
                        void* stream, Workspace ws) {
  const LaunchPlan plan = plan_softmax_bwd(p, dtype, dev);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return run(plan, device, ws, [&]() -> cudaError_t {
    return with_dtype(dtype, [&](auto t) -> cudaError_t {
      using T = decltype(t);
      if constexpr (std::is_same<T, float>::value) {
        return cudaErrorInvalidValue;  // the plan refuses float32
      } else {
        return with_bucket<64, 128, 256>(plan.head_dim_bucket, [&](auto bucket) -> cudaError_t {
          return softmax_bwd_mma<T, decltype(bucket)::value>(p, plan, ws.data, s);
        });
      }
    });
  });
}

const char* linear_fwd(const LinearFwdParams& p, DType dtype, const DeviceInfo& dev, int device,
                       void* stream, Workspace ws) {
  const LaunchPlan plan = plan_linear_fwd(p, dtype, dev);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return run(plan, device, ws, [&]() -> cudaError_t {
    return with_dtype(dtype, [&](auto t) -> cudaError_t {
      using T = decltype(t);
      return with_bucket<64, 128>(plan.head_dim_bucket, [&](auto bucket) -> cudaError_t {
        constexpr int kB = decltype(bucket)::value;
        if (plan.kernel == "linear_recurrent_fwd") return linear_recurrent_fwd<T, kB>(p, plan, s);
        return linear_chunk_fwd<T, kB>(p, plan, ws.data, s);
      });
    });
  });
}

const char* linear_bwd(const LinearBwdParams& p, DType dtype, const DeviceInfo& dev, int device,
                       void* stream, Workspace ws) {
  const LaunchPlan plan = plan_linear_bwd(p, dtype, dev);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return run(plan, device, ws, [&]() -> cudaError_t {
    return with_dtype(dtype, [&](auto t) -> cudaError_t {
      using T = decltype(t);
      return with_bucket<64, 128>(plan.head_dim_bucket, [&](auto bucket) -> cudaError_t {
        return linear_chunk_bwd<T, decltype(bucket)::value>(p, plan, ws.data, s);
      });
    });
  });
}

}  // namespace cuda
}  // namespace pyattn
