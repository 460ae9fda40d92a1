// pyattn._cuda: Python bindings of the CUDA kernels.
//
// Compiled by the host compiler without CUDA headers; the kernels sit behind the plain C++
// functions of cuda_launch.h. Arguments are raw device pointers, sizes, element strides (the
// layout of pyattn._C's, see bindings_args.h), the device's properties (for the launch plan),
// the device index, a cudaStream_t as an integer (torch.cuda.current_stream(device).cuda_stream)
// and a float32 workspace (data_ptr(), floats) sized by the matching plan_* function.
//
// The plan_* functions and merge_split_rows are host code: they touch no GPU, so the tests run
// them on machines without one. Importing this module touches no GPU either.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings_args.h"
#include "cuda_launch.h"
#include "cuda_plans.h"
#include "softmax/lse_merge.h"

namespace py = pybind11;

namespace {

using pyattn::Shape4;
using pyattn::bindings::check_dtype;
using pyattn::bindings::LinearArgs;
using pyattn::bindings::Stride3;
using pyattn::bindings::Tensor3;
using pyattn::bindings::Tensor4;
using pyattn::cuda::DeviceInfo;
using pyattn::cuda::DType;
using pyattn::cuda::LaunchPlan;
using pyattn::cuda::Workspace;
using DeviceProps = std::array<int64_t, 4>;  // major, minor, multiprocessors, max opt-in smem per block
using WorkspaceArg = std::tuple<uintptr_t, int64_t>;

DType dtype_code(int dtype) {
  check_dtype(dtype);
  return static_cast<DType>(dtype);
}

DeviceInfo device_info(const DeviceProps& props) {
  DeviceInfo dev;
  dev.sm_major = static_cast<int>(props[0]);
  dev.sm_minor = static_cast<int>(props[1]);
  dev.num_sms = static_cast<int>(props[2]);
  dev.max_smem_optin = props[3];
  if (dev.num_sms <= 0) throw py::value_error("device_info: the multiprocessor count must be positive");
  return dev;
}

Workspace workspace(const WorkspaceArg& ws) {
  return Workspace{reinterpret_cast<float*>(std::get<0>(ws)), std::get<1>(ws)};
}

void check(const char* error, const char* what) {
  if (error != nullptr) throw std::runtime_error(std::string("pyattn._cuda.") + what + ": " + error);
}

py::dict plan_dict(const LaunchPlan& plan) {
  py::dict d;
  d["kernel"] = plan.kernel;
  d["head_dim_bucket"] = plan.head_dim_bucket;
  d["grid"] = py::make_tuple(plan.grid[0], plan.grid[1], plan.grid[2]);
  d["block"] = plan.block;
  d["smem_bytes"] = plan.smem_bytes;
  d["num_splits"] = plan.num_splits;
  d["workspace_floats"] = plan.workspace_floats;
  d["error"] = plan.ok() ? py::object(py::none()) : py::object(py::str(plan.error));
  return d;
}

// Any non-null address: plans read which optional tensors are present, never their contents.
float kPresent = 0.0f;

pyattn::SoftmaxFwdParams softmax_shape_params(const Shape4& q_size, const Shape4& k_size,
                                              const Shape4& v_size, float scale, bool causal,
                                              int64_t window_left, int64_t window_right, float softcap) {
  const Shape4 zero{0, 0, 0, 0};
  return pyattn::softmax_fwd_params(0, 0, 0, 0, 0, q_size, zero, k_size, zero, v_size, zero, zero,
                                    {0, 0, 0}, scale, causal, window_left, window_right, softcap);
}

py::dict plan_softmax(const std::string& direction, const Shape4& q_size, const Shape4& k_size,
                      const Shape4& v_size, bool causal, int64_t window_left, int64_t window_right,
                      float softcap, int dtype, const DeviceProps& props) {
  pyattn::SoftmaxBwdParams p;
  p.fwd = softmax_shape_params(q_size, k_size, v_size, 1.0f, causal, window_left, window_right, softcap);
  p.fwd.dtype = dtype;
  if (direction == "forward") return plan_dict(pyattn::cuda::plan_softmax_fwd(p.fwd, dtype_code(dtype), device_info(props)));
  if (direction == "backward") return plan_dict(pyattn::cuda::plan_softmax_bwd(p, dtype_code(dtype), device_info(props)));
  throw py::value_error("direction must be 'forward' or 'backward', got '" + direction + "'");
}

py::dict plan_linear(const std::string& direction, const LinearArgs& args, bool has_decay,
                     bool has_initial_state, bool has_final_state, const DeviceProps& props) {
  pyattn::LinearBwdParams p;
  args.apply(p.fwd);
  if (has_decay) p.fwd.log_decay = &kPresent;
  if (has_initial_state) p.fwd.state_s = p.fwd.state_z = &kPresent;
  if (has_final_state) p.fwd.final_s = p.fwd.final_z = &kPresent;
  if (direction == "forward") {
    return plan_dict(pyattn::cuda::plan_linear_fwd(p.fwd, dtype_code(args.dtype), device_info(props)));
  }
  if (direction == "backward") {
    if (has_decay) p.dlog_decay = &kPresent;
    if (has_initial_state) p.dstate_s = p.dstate_z = &kPresent;
    return plan_dict(pyattn::cuda::plan_linear_bwd(p, dtype_code(args.dtype), device_info(props)));
  }
  throw py::value_error("direction must be 'forward' or 'backward', got '" + direction + "'");
}

void softmax_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                     const Shape4& q_size, const Shape4& q_stride, const Shape4& k_size,
                     const Shape4& k_stride, const Shape4& v_size, const Shape4& v_stride,
                     const Shape4& out_stride, const Stride3& lse_stride, float scale, bool causal,
                     int64_t window_left, int64_t window_right, float softcap, int dtype,
                     const DeviceProps& props, int device, uintptr_t stream, const WorkspaceArg& ws) {
  pyattn::SoftmaxFwdParams p = pyattn::softmax_fwd_params(
      q, k, v, out, lse, q_size, q_stride, k_size, k_stride, v_size, v_stride, out_stride,
      lse_stride, scale, causal, window_left, window_right, softcap);
  p.dtype = dtype;
  check(pyattn::cuda::softmax_fwd(p, dtype_code(dtype), device_info(props), device,
                                  reinterpret_cast<void*>(stream), workspace(ws)),
        "softmax_forward");
}

void softmax_backward(const Tensor4& q, const Tensor4& k, const Tensor4& v, const Tensor4& out,
                      const Tensor4& dout, const Tensor3& lse, const Tensor3& dlse, const Tensor4& dq,
                      const Tensor4& dk, const Tensor4& dv, const Shape4& q_size, const Shape4& k_size,
                      const Shape4& v_size, float scale, bool causal, int64_t window_left,
                      int64_t window_right, float softcap, int dtype, const DeviceProps& props,
                      int device, uintptr_t stream, const WorkspaceArg& ws) {
  const Tensor4 no_dbias{0, Shape4{0, 0, 0, 0}};
  pyattn::SoftmaxBwdParams p = pyattn::bindings::softmax_bwd_params(
      q, k, v, out, dout, lse, dlse, dq, dk, dv, no_dbias, q_size, k_size, v_size, scale, causal,
      window_left, window_right, softcap);
  p.fwd.dtype = dtype;
  check(pyattn::cuda::softmax_bwd(p, dtype_code(dtype), device_info(props), device,
                                  reinterpret_cast<void*>(stream), workspace(ws)),
        "softmax_backward");
}

void linear_forward(const Tensor4& q, const Tensor4& k, const Tensor4& v, const Tensor3& log_decay,
                    const Tensor4& state_s, const Tensor3& state_z, const Tensor4& out,
                    const Tensor4& final_s, const Tensor3& final_z, const LinearArgs& args,
                    const DeviceProps& props, int device, uintptr_t stream, const WorkspaceArg& ws) {
  const pyattn::LinearFwdParams p = pyattn::bindings::linear_fwd_params(
      args, q, k, v, log_decay, state_s, state_z, out, final_s, final_z);
  check(pyattn::cuda::linear_fwd(p, dtype_code(args.dtype), device_info(props), device,
                                 reinterpret_cast<void*>(stream), workspace(ws)),
        "linear_forward");
}

void linear_backward(const Tensor4& q, const Tensor4& k, const Tensor4& v, const Tensor3& log_decay,
                     const Tensor4& state_s, const Tensor3& state_z, const Tensor4& dout,
                     const Tensor4& dfinal_s, const Tensor3& dfinal_z, const Tensor4& dq,
                     const Tensor4& dk, const Tensor4& dv, const Tensor3& dlog_decay,
                     const Tensor4& dstate_s, const Tensor3& dstate_z, const LinearArgs& args,
                     const DeviceProps& props, int device, uintptr_t stream, const WorkspaceArg& ws) {
  const pyattn::LinearBwdParams p = pyattn::bindings::linear_bwd_params(
      args, q, k, v, log_decay, state_s, state_z, dout, dfinal_s, dfinal_z, dq, dk, dv, dlog_decay,
      dstate_s, dstate_z);
  check(pyattn::cuda::linear_bwd(p, dtype_code(args.dtype), device_info(props), device,
                                 reinterpret_cast<void*>(stream), workspace(ws)),
        "linear_backward");
}

// Host copy of the combine step of split-KV decoding, for tests: float32 CPU buffers.
void merge_split_rows(int splits, int64_t rows, int dv, uintptr_t part_lse, uintptr_t part_out,
                      uintptr_t lse, uintptr_t out) {
  if (splits < 1 || rows < 0 || dv < 0) throw py::value_error("merge_split_rows: bad sizes");
  pyattn::cuda::merge_split_rows(splits, rows, dv, reinterpret_cast<const float*>(part_lse),
                                 reinterpret_cast<const float*>(part_out),
                                 reinterpret_cast<float*>(lse), reinterpret_cast<float*>(out));
}

}  // namespace

// The CPU emulation's build of these bindings (tests/cuda_emulation) picks another name.
#ifndef PYATTN_CUDA_MODULE_NAME
#define PYATTN_CUDA_MODULE_NAME _cuda
#endif

PYBIND11_MODULE(PYATTN_CUDA_MODULE_NAME, m) {
  m.doc() = "pyattn CUDA kernels (raw pointers; call them through pyattn.launchers)";

  m.def("plan_softmax", &plan_softmax, py::arg("direction"), py::arg("q_size"), py::arg("k_size"),
        py::arg("v_size"), py::kw_only(), py::arg("causal"), py::arg("window_left"),
        py::arg("window_right"), py::arg("softcap"), py::arg("dtype"), py::arg("device_info"),
        "The launch plan of softmax attention 'forward' or 'backward' for these sizes (B,H,S,D) "
        "on a device with device_info = (major, minor, multiprocessors, max opt-in shared memory "
        "per block): dict of kernel, head_dim_bucket, grid, block, smem_bytes, num_splits, "
        "workspace_floats, error (None: runnable). Host only.");
  m.def("plan_linear", &plan_linear, py::arg("direction"), py::arg("args"), py::kw_only(),
        py::arg("has_decay"), py::arg("has_initial_state"), py::arg("has_final_state"),
        py::arg("device_info"), "The launch plan of linear attention (as plan_softmax). Host only.");
  m.def("head_dim_bucket", &pyattn::cuda::head_dim_bucket, py::arg("head_dim"),
        "The templated head-dim bucket a head dim runs in (0: none).");
  m.def("merge_split_rows", &merge_split_rows, py::arg("splits"), py::arg("rows"), py::arg("dv"),
        py::arg("part_lse"), py::arg("part_out"), py::arg("lse"), py::arg("out"),
        "Host version of the split-KV merge: part_lse [splits][rows], part_out [splits][rows][dv] "
        "-> lse [rows], out [rows][dv], float32 CPU pointers (the device kernel's arithmetic).");

  m.def("softmax_forward", &softmax_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("q_size"), py::arg("q_stride"),
        py::arg("k_size"), py::arg("k_stride"), py::arg("v_size"), py::arg("v_stride"),
        py::arg("out_stride"), py::arg("lse_stride"), py::kw_only(), py::arg("scale"),
        py::arg("causal"), py::arg("window_left"), py::arg("window_right"),
        py::arg("softcap"), py::arg("dtype"), py::arg("device_info"), py::arg("device"),
        py::arg("stream"), py::arg("workspace"),
        "Fused softmax attention forward on a CUDA stream. q (B,Hq,Sq,D), k (B,Hkv,Sk,D), "
        "v (B,Hkv,Sk,Dv) -> out (B,Hq,Sq,Dv) in the input dtype (0 float32, 1 float16, "
        "2 bfloat16), lse (B,Hq,Sq) float32 (lse=0: not written). Asynchronous.");
  m.def("softmax_backward", &softmax_backward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("dout"), py::arg("lse"), py::arg("dlse"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("q_size"), py::arg("k_size"), py::arg("v_size"),
        py::kw_only(), py::arg("scale"), py::arg("causal"), py::arg("window_left"),
        py::arg("window_right"), py::arg("softcap"), py::arg("dtype"), py::arg("device_info"),
        py::arg("device"), py::arg("stream"), py::arg("workspace"),
        "Fused softmax attention backward (tensors as (data_ptr(), strides), as pyattn._C's): "
        "q, k, v, out, dout, lse, dlse (ptr 0: zero) -> dq, dk, dv. Asynchronous.");
  pyattn::bindings::bind_linear_args(m);
  m.def("linear_forward", &linear_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("log_decay"), py::arg("state_s"), py::arg("state_z"), py::arg("out"),
        py::arg("final_s"), py::arg("final_z"), py::kw_only(), py::arg("args"),
        py::arg("device_info"), py::arg("device"), py::arg("stream"), py::arg("workspace"),
        "Causal linear-recurrent attention forward (arguments as pyattn._C.linear_forward's). "
        "Asynchronous.");
  m.def("linear_backward", &linear_backward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("log_decay"), py::arg("state_s"), py::arg("state_z"), py::arg("dout"),
        py::arg("dfinal_s"), py::arg("dfinal_z"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        py::arg("dlog_decay"), py::arg("dstate_s"), py::arg("dstate_z"), py::kw_only(),
        py::arg("args"), py::arg("device_info"), py::arg("device"), py::arg("stream"),
        py::arg("workspace"),
        "Causal linear-recurrent attention backward (arguments as pyattn._C.linear_backward's). "
        "Asynchronous.");

  m.attr("cuda_archs") = PYATTN_CUDA_ARCHS_STRING;
  m.attr("cuda_compiler_version") = PYATTN_CUDA_COMPILER_VERSION;
}
