// pyattn._C: Python bindings of the C++ CPU kernels.
//
// The functions take raw data pointers (tensor.data_ptr()), sizes and element strides;
// the Python launchers in pyattn/launchers/ build these arguments from tensors that the
// ops have already validated. Nothing here checks shapes: a wrong pointer crashes.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "common/parallel.h"
#include "softmax/params_from_args.h"
#include "softmax/attention_cpu.h"

namespace py = pybind11;

namespace {

using pyattn::Shape4;
using Stride3 = std::array<int64_t, 3>;
using Tensor4 = std::tuple<uintptr_t, Shape4>;   // data_ptr(), element strides
using Tensor3 = std::tuple<uintptr_t, Stride3>;

// The optional features both directions take as keyword arguments.
struct Features {
  int dtype;
  uintptr_t bias;
  int bias_kind;
  Shape4 bias_stride;
  float dropout_p;
  uint32_t dropout_threshold;
  uint64_t dropout_seed;
  Stride3 dropout_stride;
  uintptr_t cu_seqlens_q, cu_seqlens_k;

  void apply(pyattn::SoftmaxFwdParams& p) const {
    if (dtype < 0 || dtype > 2) {
      throw py::value_error("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
    }
    if (bias_kind < 0 || bias_kind > 2) {
      throw py::value_error("bias_kind must be 0 (none), 1 (float32) or 2 (bool)");
    }
    p.dtype = dtype;
    p.bias = reinterpret_cast<const void*>(bias);
    p.bias_kind = bias != 0 ? bias_kind : pyattn::SoftmaxFwdParams::kBiasNone;
    for (int d = 0; d < 4; ++d) p.bias_stride[d] = bias_stride[d];
    p.dropout_p = dropout_p;
    p.dropout_threshold = dropout_threshold;
    p.dropout_seed = dropout_seed;
    for (int d = 0; d < 3; ++d) p.dropout_stride[d] = dropout_stride[d];
    p.cu_seqlens_q = reinterpret_cast<const int32_t*>(cu_seqlens_q);
    p.cu_seqlens_k = reinterpret_cast<const int32_t*>(cu_seqlens_k);
    if ((cu_seqlens_q == 0) != (cu_seqlens_k == 0)) {
      throw py::value_error("give both cu_seqlens or neither");
    }
  }
};

void softmax_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                     const Shape4& q_size, const Shape4& q_stride, const Shape4& k_size,
                     const Shape4& k_stride, const Shape4& v_size, const Shape4& v_stride,
                     const Shape4& out_stride, const Stride3& lse_stride, float scale, bool causal,
                     int64_t window_left, int64_t window_right, float softcap, int num_threads,
                     const Features& features) {
  pyattn::SoftmaxFwdParams p = pyattn::softmax_fwd_params(
      q, k, v, out, lse, q_size, q_stride, k_size, k_stride, v_size, v_stride, out_stride,
      lse_stride, scale, causal, window_left, window_right, softcap);
  features.apply(p);
  py::gil_scoped_release no_gil;
  pyattn::cpu::softmax_fwd(p, num_threads);
}

template <size_t N>
void copy_strides(int64_t (&dst)[N], const std::array<int64_t, N>& src) {
  for (size_t d = 0; d < N; ++d) dst[d] = src[d];
}

void softmax_backward(const Tensor4& q, const Tensor4& k, const Tensor4& v, const Tensor4& out,
                      const Tensor4& dout, const Tensor3& lse, const Tensor3& dlse,
                      const Tensor4& dq, const Tensor4& dk, const Tensor4& dv,
                      const Tensor4& dbias, const Shape4& q_size, const Shape4& k_size,
                      const Shape4& v_size, float scale, bool causal,
                      int64_t window_left, int64_t window_right, float softcap, int num_threads,
                      const Features& features) {
  pyattn::SoftmaxBwdParams p;
  p.fwd = pyattn::softmax_fwd_params(
      std::get<0>(q), std::get<0>(k), std::get<0>(v), std::get<0>(out), std::get<0>(lse), q_size,
      std::get<1>(q), k_size, std::get<1>(k), v_size, std::get<1>(v), std::get<1>(out),
      std::get<1>(lse), scale, causal, window_left, window_right, softcap);
  features.apply(p.fwd);
  p.dout = reinterpret_cast<const void*>(std::get<0>(dout));
  copy_strides(p.dout_stride, std::get<1>(dout));
  p.dlse = reinterpret_cast<const float*>(std::get<0>(dlse));
  copy_strides(p.dlse_stride, std::get<1>(dlse));
  p.dq = reinterpret_cast<void*>(std::get<0>(dq));
  p.dk = reinterpret_cast<void*>(std::get<0>(dk));
  p.dv = reinterpret_cast<void*>(std::get<0>(dv));
  copy_strides(p.dq_stride, std::get<1>(dq));
  copy_strides(p.dk_stride, std::get<1>(dk));
  copy_strides(p.dv_stride, std::get<1>(dv));
  p.dbias = reinterpret_cast<float*>(std::get<0>(dbias));
  copy_strides(p.dbias_stride, std::get<1>(dbias));
  py::gil_scoped_release no_gil;
  pyattn::cpu::softmax_bwd(p, num_threads);
}

std::vector<std::string> supported_isas() {
  const pyattn::cpu::IsaKernel* kernels[3];
  const int n = pyattn::cpu::available_isas(kernels, 3);
  std::vector<std::string> names;
  for (int i = 0; i < n; ++i) names.emplace_back(kernels[i]->name);
  return names;
}

std::string set_isa(const std::string& name) {
  std::string previous = pyattn::cpu::forced_isa();
  if (!pyattn::cpu::set_isa(name.c_str())) {
    throw py::value_error("set_isa: '" + name + "' is not one of this CPU's kernels " +
                          py::str(py::cast(supported_isas())).cast<std::string>());
  }
  return previous;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyattn C++ CPU kernels (raw pointers; call them through pyattn.launchers)";

  py::class_<Features>(
      m, "Features",
      "Optional features of softmax_forward / softmax_backward: input dtype (0 float32, "
      "1 float16, 2 bfloat16); attn_bias pointer, kind (0 none, 1 float32 added, 2 bool keep "
      "mask) and (B, Hq, Sq, Sk) strides; dropout p, threshold ceil(p * 2**24), Philox seed and "
      "counter strides (b, h, i); cu_seqlens pointers (int32) of a packed batch (0: dense).")
      .def(py::init([](int dtype, uintptr_t bias, int bias_kind, const Shape4& bias_stride,
                       float dropout_p, uint32_t dropout_threshold, uint64_t dropout_seed,
                       const Stride3& dropout_stride, uintptr_t cu_seqlens_q,
                       uintptr_t cu_seqlens_k) {
             return Features{dtype, bias, bias_kind, bias_stride, dropout_p, dropout_threshold,
                             dropout_seed, dropout_stride, cu_seqlens_q, cu_seqlens_k};
           }),
           py::kw_only(), py::arg("dtype") = 0, py::arg("bias") = 0, py::arg("bias_kind") = 0,
           py::arg("bias_stride") = Shape4{0, 0, 0, 0}, py::arg("dropout_p") = 0.0f,
           py::arg("dropout_threshold") = 0, py::arg("dropout_seed") = 0,
           py::arg("dropout_stride") = Stride3{0, 0, 0}, py::arg("cu_seqlens_q") = 0,
           py::arg("cu_seqlens_k") = 0);

  m.def("softmax_forward", &softmax_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("q_size"), py::arg("q_stride"),
        py::arg("k_size"), py::arg("k_stride"), py::arg("v_size"), py::arg("v_stride"),
        py::arg("out_stride"), py::arg("lse_stride"), py::kw_only(), py::arg("scale"),
        py::arg("causal"), py::arg("window_left"), py::arg("window_right"),
        py::arg("softcap"), py::arg("num_threads"), py::arg("features") = Features{},
        "Fused softmax attention forward. q (B,Hq,Sq,D), k (B,Hkv,Sk,D), "
        "v (B,Hkv,Sk,Dv) -> out (B,Hq,Sq,Dv), lse (B,Hq,Sq) float32 (lse=0: not written). "
        "Pointers are data_ptr() values, strides are in elements.");

  m.def("softmax_backward", &softmax_backward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("dout"), py::arg("lse"), py::arg("dlse"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("dbias"), py::arg("q_size"), py::arg("k_size"),
        py::arg("v_size"), py::kw_only(), py::arg("scale"), py::arg("causal"),
        py::arg("window_left"), py::arg("window_right"), py::arg("softcap"),
        py::arg("num_threads"), py::arg("features") = Features{},
        "Fused softmax attention backward. Each tensor is (data_ptr(), element strides): "
        "q, k, v, out (the forward's output), dout, lse (float32), dlse (float32; ptr 0: zero) -> "
        "dq, dk, dv (input dtype) and dbias ((B,Hq,Sq,Sk) float32 gradient of the final scores, "
        "ptr 0: not computed; elements of skipped blocks are left as they are, so pass zeros).");

  m.def("supported_isas", &supported_isas,
        "Instruction-set variants of the CPU kernels this machine can run, best first.");
  m.def("current_isa", [] { return std::string(pyattn::cpu::current_isa()); },
        "The variant the kernels use now.");
  m.def("parallel_backend", [] { return std::string(pyattn::parallel_backend()); },
        "'openmp': kernels run on the OpenMP runtime already loaded in the process (torch's), "
        "so they share its threads; 'pool': on pyattn's own sleeping thread pool.");
  m.def("use_own_pool_only", &pyattn::use_own_pool_only, py::arg("own"),
        "True: never borrow the loaded OpenMP runtime (for tests of the pool).");
  m.def("set_isa", &set_isa, py::arg("name"),
        "Force a variant from supported_isas() ('' = best available); returns the previously "
        "forced one ('' if none), so set_isa(previous) restores it. Meant for tests.");
}
