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

#include "bindings_args.h"
#include "common/parallel.h"
#include "softmax/params_from_args.h"
#include "softmax/attention_cpu.h"
#include "linear/linear_cpu.h"

namespace py = pybind11;

namespace {

using pyattn::Shape4;
using pyattn::bindings::check_dtype;
using pyattn::bindings::LinearArgs;
using pyattn::bindings::Stride3;
using pyattn::bindings::Tensor3;
using pyattn::bindings::Tensor4;

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
    check_dtype(dtype);
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

void softmax_backward(const Tensor4& q, const Tensor4& k, const Tensor4& v, const Tensor4& out,
                      const Tensor4& dout, const Tensor3& lse, const Tensor3& dlse,
                      const Tensor4& dq, const Tensor4& dk, const Tensor4& dv,
                      const Tensor4& dbias, const Shape4& q_size, const Shape4& k_size,
                      const Shape4& v_size, float scale, bool causal,
                      int64_t window_left, int64_t window_right, float softcap, int num_threads,
                      const Features& features) {
  pyattn::SoftmaxBwdParams p = pyattn::bindings::softmax_bwd_params(
      q, k, v, out, dout, lse, dlse, dq, dk, dv, dbias, q_size, k_size, v_size, scale, causal,
      window_left, window_right, softcap);
  features.apply(p.fwd);
  py::gil_scoped_release no_gil;
  pyattn::cpu::softmax_bwd(p, num_threads);
}

// ---------------------------------------------------------------- linear attention

void linear_forward(const Tensor4& q, const Tensor4& k, const Tensor4& v, const Tensor3& log_decay,
                    const Tensor4& state_s, const Tensor3& state_z, const Tensor4& out,
                    const Tensor4& final_s, const Tensor3& final_z, const LinearArgs& args,
                    int num_threads) {
  const pyattn::LinearFwdParams p = pyattn::bindings::linear_fwd_params(
      args, q, k, v, log_decay, state_s, state_z, out, final_s, final_z);
  py::gil_scoped_release no_gil;
  pyattn::cpu::linear_fwd(p, num_threads);
}

void linear_backward(const Tensor4& q, const Tensor4& k, const Tensor4& v, const Tensor3& log_decay,
                     const Tensor4& state_s, const Tensor3& state_z, const Tensor4& dout,
                     const Tensor4& dfinal_s, const Tensor3& dfinal_z, const Tensor4& dq,
                     const Tensor4& dk, const Tensor4& dv, const Tensor3& dlog_decay,
                     const Tensor4& dstate_s, const Tensor3& dstate_z, const LinearArgs& args,
                     int num_threads) {
  const pyattn::LinearBwdParams p = pyattn::bindings::linear_bwd_params(
      args, q, k, v, log_decay, state_s, state_z, dout, dfinal_s, dfinal_z, dq, dk, dv, dlog_decay,
      dstate_s, dstate_z);
  py::gil_scoped_release no_gil;
  pyattn::cpu::linear_bwd(p, num_threads);
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

  pyattn::bindings::bind_linear_args(m);

  m.def("linear_forward", &linear_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("log_decay"), py::arg("state_s"), py::arg("state_z"), py::arg("out"),
        py::arg("final_s"), py::arg("final_z"), py::kw_only(), py::arg("args"),
        py::arg("num_threads"),
        "Linear-recurrent attention forward. Each tensor is (data_ptr(), element strides): "
        "q (B,Hq,S,F), k (B,Hkv,S,F), v (B,Hkv,S,Dv) in the input dtype; log_decay (B,Hq,S) "
        "float32 (ptr 0: none); initial state S (B,Hq,F,Dv), z (B,Hq,F) float32 (ptr 0: zeros) "
        "-> out (B,Hq,S,Dv) input dtype, final state float32 (ptr 0: not written).");
  m.def("linear_backward", &linear_backward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("log_decay"), py::arg("state_s"), py::arg("state_z"), py::arg("dout"),
        py::arg("dfinal_s"), py::arg("dfinal_z"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        py::arg("dlog_decay"), py::arg("dstate_s"), py::arg("dstate_z"), py::kw_only(),
        py::arg("args"), py::arg("num_threads"),
        "Linear-recurrent attention backward: the forward's inputs, dout and the final state's "
        "gradients (ptr 0: zero) -> dq, dk, dv (input dtype), dlog_decay (B,Hq,S) float32 and "
        "the initial state's gradients (ptr 0: not computed).");

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
