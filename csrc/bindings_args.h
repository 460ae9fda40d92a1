// The raw arguments both Python modules (pyattn._C, pyattn._cuda) receive, turned into the
// kernels' parameter structs one way. A tensor crosses as (data_ptr(), element strides);
// sizes travel separately. Only what would make a kernel divide by zero or index a table
// out of range is checked here: shapes were validated in Python (pyattn/ops).
#pragma once

#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <tuple>

#include "linear/linear_params.h"
#include "softmax/params.h"
#include "softmax/params_from_args.h"

namespace pyattn {
namespace bindings {

namespace py = pybind11;

using Stride3 = std::array<int64_t, 3>;
using Tensor4 = std::tuple<uintptr_t, Shape4>;  // data_ptr(), element strides
using Tensor3 = std::tuple<uintptr_t, Stride3>;
using Sizes6 = std::array<int64_t, 6>;  // linear: batch, heads_q, heads_kv, seq, feature dim, dim_v

// The kernels' dtype code (an unknown code would index past tables).
inline void check_dtype(int dtype) {
  if (dtype < 0 || dtype > 2) {
    throw py::value_error("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  }
}

template <size_t N>
void copy_strides(int64_t (&dst)[N], const std::array<int64_t, N>& src) {
  for (size_t d = 0; d < N; ++d) dst[d] = src[d];
}

template <typename T, size_t N>
void take(T*& ptr, int64_t (&stride)[N], const std::tuple<uintptr_t, std::array<int64_t, N>>& t) {
  ptr = reinterpret_cast<T*>(std::get<0>(t));
  copy_strides(stride, std::get<1>(t));
}

// The backward's tensors around the forward's parameters (features are applied by the caller).
inline SoftmaxBwdParams softmax_bwd_params(const Tensor4& q, const Tensor4& k, const Tensor4& v,
                                           const Tensor4& out, const Tensor4& dout,
                                           const Tensor3& lse, const Tensor3& dlse,
                                           const Tensor4& dq, const Tensor4& dk, const Tensor4& dv,
                                           const Tensor4& dbias, const Shape4& q_size,
                                           const Shape4& k_size, const Shape4& v_size, float scale,
                                           bool causal, int64_t window_left, int64_t window_right,
                                           float softcap) {
  SoftmaxBwdParams p;
  p.fwd = softmax_fwd_params(std::get<0>(q), std::get<0>(k), std::get<0>(v), std::get<0>(out),
                             std::get<0>(lse), q_size, std::get<1>(q), k_size, std::get<1>(k),
                             v_size, std::get<1>(v), std::get<1>(out), std::get<1>(lse), scale,
                             causal, window_left, window_right, softcap);
  take(p.dout, p.dout_stride, dout);
  take(p.dlse, p.dlse_stride, dlse);
  take(p.dq, p.dq_stride, dq);
  take(p.dk, p.dk_stride, dk);
  take(p.dv, p.dv_stride, dv);
  take(p.dbias, p.dbias_stride, dbias);
  return p;
}

// ---------------------------------------------------------------- linear attention

// The plain arguments both directions take.
struct LinearArgs {
  Sizes6 sizes;
  int dtype, feature_map;
  bool causal, normalize;
  float scale, eps;

  void apply(LinearFwdParams& p) const {
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

inline LinearFwdParams linear_fwd_params(const LinearArgs& args, const Tensor4& q, const Tensor4& k,
                                         const Tensor4& v, const Tensor3& log_decay,
                                         const Tensor4& state_s, const Tensor3& state_z,
                                         const Tensor4& out, const Tensor4& final_s,
                                         const Tensor3& final_z) {
  LinearFwdParams p;
  args.apply(p);
  take(p.q, p.q_stride, q);
  take(p.k, p.k_stride, k);
  take(p.v, p.v_stride, v);
  take(p.log_decay, p.decay_stride, log_decay);
  take(p.state_s, p.state_s_stride, state_s);
  take(p.state_z, p.state_z_stride, state_z);
  if ((p.state_s == nullptr) != (p.state_z == nullptr)) {
    throw py::value_error("give both parts of the initial state or neither");
  }
  take(p.out, p.out_stride, out);
  take(p.final_s, p.final_s_stride, final_s);
  take(p.final_z, p.final_z_stride, final_z);
  return p;
}

inline LinearBwdParams linear_bwd_params(const LinearArgs& args, const Tensor4& q, const Tensor4& k,
                                         const Tensor4& v, const Tensor3& log_decay,
                                         const Tensor4& state_s, const Tensor3& state_z,
                                         const Tensor4& dout, const Tensor4& dfinal_s,
                                         const Tensor3& dfinal_z, const Tensor4& dq,
                                         const Tensor4& dk, const Tensor4& dv,
                                         const Tensor3& dlog_decay, const Tensor4& dstate_s,
                                         const Tensor3& dstate_z) {
  LinearBwdParams p;
  const Tensor4 none4{0, Shape4{0, 0, 0, 0}};
  const Tensor3 none3{0, Stride3{0, 0, 0}};
  p.fwd = linear_fwd_params(args, q, k, v, log_decay, state_s, state_z, none4, none4, none3);
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
  return p;
}

// Python's view of LinearArgs (the same keyword constructor in both modules).
inline void bind_linear_args(py::module_& m) {
  // module_local: pyattn._C and pyattn._cuda both bind this C++ type, and pybind11 would otherwise
  // refuse the second registration in a process that imports both.
  py::class_<LinearArgs>(
      m, "LinearArgs", py::module_local(),
      "Plain arguments of linear_forward / linear_backward: sizes (B, Hq, Hkv, S, F, Dv), dtype "
      "(0 float32, 1 float16, 2 bfloat16), feature_map (0 identity, 1 elu + 1, 2 relu), causal, "
      "normalize, scale (qf = f(q) * scale), eps.")
      .def(py::init([](const Sizes6& sizes, int dtype, int feature_map, bool causal, bool normalize,
                       float scale, float eps) {
             return LinearArgs{sizes, dtype, feature_map, causal, normalize, scale, eps};
           }),
           py::kw_only(), py::arg("sizes"), py::arg("dtype"), py::arg("feature_map"),
           py::arg("causal"), py::arg("normalize"), py::arg("scale"), py::arg("eps"));
}

}  // namespace bindings
}  // namespace pyattn
