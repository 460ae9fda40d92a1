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
#include "linear/linear_cpu.h"

namespace py = pybind11;

namespace {

using pyattn::Shape4;
using Stride3 = std::array<int64_t, 3>;
using Tensor4 = std::tuple<uintptr_t, Shape4>;   // data_ptr(), element strides
using Tensor3 = std::tuple<uintptr_t, Stride3>;

// The kernels' dtype code, shared by every binding (an unknown code would index past tables).
void check_dtype(int dtype) {
  if (dtype < 0 || dtype > 2) {
    throw py::value_error("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  }
}

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

// ---------------------------------------------------------------- linear attention

using Sizes6 = std::array<int64_t, 6>;  // batch, heads_q, heads_kv, seq, feature dim, dim_v

// The plain arguments both directions take; only what keeps the kernels from dividing by
// zero or indexing a table out of range is checked here (shapes were validated in Python).
struct LinearArgs {
  Sizes6 sizes;
  int dtype, feature_map;
  bool causal, normalize;
  float scale, eps;

  void apply(pyattn::LinearFwdParams& p) const {
    check_dtype(dtype);
    if (feature_map < 0 || feature_map > 2) {
      throw py::value_error("feature_map must be 0 (identity), 1 (elu + 1) or 2 (relu)");
    }
    for (int64_t x : sizes) {
      if (x < 0) throw py::value_error("sizes must be non-negative");
    }
    if (sizes[2] == 0 || sizes[1] % sizes[2] != 0) {
      throw py::value_error("heads_kv must be positive and divide heads_q");
    }
    p.batch = sizes[0];
    p.heads_q = sizes[1];
    p.heads_kv = sizes[2];
    p.seq = sizes[3];
    p.feat = sizes[4];
    p.dim_v = sizes[5];
    p.dtype = dtype;
    p.feature_map = feature_map;
    p.causal = causal;
    p.normalize = normalize;
    p.scale = scale;
    p.eps = eps;
  }
};

template <typename T, size_t N>
void take(T*& ptr, int64_t (&stride)[N], const std::tuple<uintptr_t, std::array<int64_t, N>>& t) {
  ptr = reinterpret_cast<T*>(std::get<0>(t));
  copy_strides(stride, std::get<1>(t));
}

void linear_inputs(pyattn::LinearFwdParams& p, const Tensor4& q, const Tensor4& k, const Tensor4& v,
                   const Tensor3& log_decay, const Tensor4& state_s, const Tensor3& state_z) {
  take(p.q, p.q_stride, q);
  take(p.k, p.k_stride, k);
  take(p.v, p.v_stride, v);
  take(p.log_decay, p.decay_stride, log_decay);
  take(p.state_s, p.state_s_stride, state_s);
  take(p.state_z, p.state_z_stride, state_z);
  if ((p.state_s == nullptr) != (p.state_z == nullptr)) {
    throw py::value_error("give both parts of the initial state or neither");
  }
}

void linear_forward(const Tensor4& q, const Tensor4& k, const Tensor4& v, const Tensor3& log_decay,
                    const Tensor4& state_s, const Tensor3& state_z, const Tensor4& out,
                    const Tensor4& final_s, const Tensor3& final_z, const LinearArgs& args,
                    int num_threads) {
  pyattn::LinearFwdParams p;
  args.apply(p);
  linear_inputs(p, q, k, v, log_decay, state_s, state_z);
  take(p.out, p.out_stride, out);
  take(p.final_s, p.final_s_stride, final_s);
  take(p.final_z, p.final_z_stride, final_z);
  py::gil_scoped_release no_gil;
  pyattn::cpu::linear_fwd(p, num_threads);
}

void linear_backward(const Tensor4& q, const Tensor4& k, const Tensor4& v, const Tensor3& log_decay,
                     const Tensor4& state_s, const Tensor3& state_z, const Tensor4& dout,
                     const Tensor4& dfinal_s, const Tensor3& dfinal_z, const Tensor4& dq,
                     const Tensor4& dk, const Tensor4& dv, const Tensor3& dlog_decay,
                     const Tensor4& dstate_s, const Tensor3& dstate_z, const LinearArgs& args,
                     int num_threads) {
  pyattn::LinearBwdParams p;
  args.apply(p.fwd);
  linear_inputs(p.fwd, q, k, v, log_decay, state_s, state_z);
  take(p.dout, p.dout_stride, dout);
  take(p.dfinal_s, p.dfinal_s_stride, dfinal_s);
  take(p.dfinal_z, p.dfinal_z_stride, dfinal_z);
  take(p.dq, p.dq_stride, dq);
  take(p.dk, p.dk_stride, dk);
  take(p.dv, p.dv_stride, dv);
  take(p.dlog_decay, p.dlog_decay_stride, dlog_decay);
  take(p.dstate_s, p.dstate_s_stride, dstate_s);
  take(p.dstate_z, p.dstate_z_stride, dstate_z);
  const bool empty = p.fwd.batch * p.fwd.heads_q * p.fwd.seq * p.fwd.feat * p.fwd.dim_v == 0;
  if (!empty && (p.dq == nullptr || p.dk == nullptr || p.dv == nullptr)) {
    throw py::value_error("linear_backward needs dq, dk and dv");
  }
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

  py::class_<LinearArgs>(
      m, "LinearArgs",
      "Plain arguments of linear_forward / linear_backward: sizes (B, Hq, Hkv, S, F, Dv), dtype "
      "(0 float32, 1 float16, 2 bfloat16), feature_map (0 identity, 1 elu + 1, 2 relu), causal, "
      "normalize, scale (qf = f(q) * scale), eps.")
      .def(py::init([](const Sizes6& sizes, int dtype, int feature_map, bool causal, bool normalize,
                       float scale, float eps) {
             return LinearArgs{sizes, dtype, feature_map, causal, normalize, scale, eps};
           }),
           py::kw_only(), py::arg("sizes"), py::arg("dtype"), py::arg("feature_map"),
           py::arg("causal"), py::arg("normalize"), py::arg("scale"), py::arg("eps"));

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
