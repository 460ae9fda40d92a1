// pyattn._cuda: Python bindings of the CUDA kernels.
//
// Compiled by the host compiler without CUDA headers; the kernels sit behind the plain
// C++ functions of csrc/softmax/attention_cuda.h. Arguments are raw device pointers,
// sizes, element strides, the device index and a cudaStream_t as an integer (from
// torch.cuda.current_stream(device).cuda_stream). Importing this module touches no GPU.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "softmax/params_from_args.h"
#include "softmax/attention_cuda.h"

namespace py = pybind11;

namespace {

using pyattn::Shape4;

void softmax_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                     const Shape4& q_size, const Shape4& q_stride, const Shape4& k_size,
                     const Shape4& k_stride, const Shape4& v_size, const Shape4& v_stride,
                     const Shape4& out_stride, const std::array<int64_t, 3>& lse_stride,
                     float scale, bool causal, int64_t window_left, int64_t window_right,
                     float softcap, int dtype, int device, uintptr_t stream) {
  if (dtype < 0 || dtype > 2) throw py::value_error("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  const pyattn::SoftmaxFwdParams p = pyattn::softmax_fwd_params(
      q, k, v, out, lse, q_size, q_stride, k_size, k_stride, v_size, v_stride, out_stride,
      lse_stride, scale, causal, window_left, window_right, softcap);
  const char* error = pyattn::cuda::softmax_fwd(p, static_cast<pyattn::cuda::DType>(dtype), device,
                                                reinterpret_cast<void*>(stream));
  if (error != nullptr) throw std::runtime_error(std::string("pyattn._cuda.softmax_forward: ") + error);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "pyattn CUDA kernels (raw pointers; call them through pyattn.launchers)";

  m.def("softmax_forward", &softmax_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("q_size"), py::arg("q_stride"),
        py::arg("k_size"), py::arg("k_stride"), py::arg("v_size"), py::arg("v_stride"),
        py::arg("out_stride"), py::arg("lse_stride"), py::kw_only(), py::arg("scale"),
        py::arg("causal"), py::arg("window_left"), py::arg("window_right"),
        py::arg("softcap"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "Fused softmax attention forward on a CUDA stream. q (B,Hq,Sq,D), k (B,Hkv,Sk,D), "
        "v (B,Hkv,Sk,Dv) -> out (B,Hq,Sq,Dv) in the input dtype (0 float32, 1 float16, "
        "2 bfloat16), lse (B,Hq,Sq) float32 (lse=0: not written). Asynchronous.");

  m.attr("cuda_archs") = PYATTN_CUDA_ARCHS_STRING;
  m.attr("cuda_compiler_version") = PYATTN_CUDA_COMPILER_VERSION;
}
