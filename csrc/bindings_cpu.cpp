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
#include <vector>

#include "common/parallel.h"
#include "softmax/params_from_args.h"
#include "softmax/attention_cpu.h"

namespace py = pybind11;

namespace {

using pyattn::Shape4;

void softmax_forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                     const Shape4& q_size, const Shape4& q_stride, const Shape4& k_size,
                     const Shape4& k_stride, const Shape4& v_size, const Shape4& v_stride,
                     const Shape4& out_stride, const std::array<int64_t, 3>& lse_stride,
                     float scale, bool causal, int64_t window_left, int64_t window_right,
                     float softcap, int num_threads) {
  const pyattn::SoftmaxFwdParams p = pyattn::softmax_fwd_params(
      q, k, v, out, lse, q_size, q_stride, k_size, k_stride, v_size, v_stride, out_stride,
      lse_stride, scale, causal, window_left, window_right, softcap);
  py::gil_scoped_release no_gil;
  pyattn::cpu::softmax_fwd(p, num_threads);
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

  m.def("softmax_forward", &softmax_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("q_size"), py::arg("q_stride"),
        py::arg("k_size"), py::arg("k_stride"), py::arg("v_size"), py::arg("v_stride"),
        py::arg("out_stride"), py::arg("lse_stride"), py::kw_only(), py::arg("scale"),
        py::arg("causal"), py::arg("window_left"), py::arg("window_right"),
        py::arg("softcap"), py::arg("num_threads"),
        "Fused softmax attention forward, float32. q (B,Hq,Sq,D), k (B,Hkv,Sk,D), "
        "v (B,Hkv,Sk,Dv) -> out (B,Hq,Sq,Dv), lse (B,Hq,Sq) (lse=0: not written). "
        "Pointers are data_ptr() values, strides are in elements.");

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
