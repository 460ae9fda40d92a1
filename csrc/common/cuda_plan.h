// Host-side launch plans of the CUDA kernels: which kernel a call runs, its grid, block,
// shared memory, key splits and the float32 workspace the caller must allocate.
//
// Plain C++ (no CUDA headers): the plan functions are pure functions of the arguments and a
// DeviceInfo, so pyattn._cuda exposes them and tests/test_cuda_host.py checks them on a
// machine without a GPU. The launchers (csrc/*/..._launch.cu) compute the same plan and
// then run exactly what it says.
#pragma once

#include <cstdint>
#include <string>

namespace pyattn {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "?";
}

// What a plan needs to know about the GPU (the launcher asks cudaDeviceGetAttribute).
struct DeviceInfo {
  int sm_major = 9, sm_minor = 0;
  int num_sms = 132;
  int64_t max_smem_optin = 227 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
};

struct LaunchPlan {
  std::string kernel;  // family name, the key of the verification registry ("softmax_fwd_mma", ...)
  int head_dim_bucket = 0;  // template head-dim bucket (0: none)
  int64_t grid[3] = {0, 1, 1};
  int block = 0;                // threads per CTA
  int64_t smem_bytes = 0;       // dynamic shared memory per CTA
  int num_splits = 1;           // split-KV decoding: key splits per row
  int64_t workspace_floats = 0; // float32 scratch the caller passes in (0: none)
  std::string error;            // non-empty: the call cannot run here, and why
  bool ok() const { return error.empty(); }
};

// Head dims are templated in buckets; a head dim runs in the smallest bucket that holds it
// (loads and stores past it are masked). 0: larger than every bucket.
inline int head_dim_bucket(int64_t d) {
  if (d <= 0) return 0;
  if (d <= 64) return 64;
  if (d <= 128) return 128;
  if (d <= 256) return 256;
  return 0;
}

// Grid limits of every CUDA device pyattn targets (sm80+).
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

}  // namespace cuda
}  // namespace pyattn
