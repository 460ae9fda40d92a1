// SoftmaxFwdParams from the raw arguments both Python bindings receive (pointers as
// integers, sizes and element strides), so the CPU and CUDA modules fill it one way.
#pragma once

#include <array>
#include <cstdint>

#include "params.h"

namespace pyattn {

using Shape4 = std::array<int64_t, 4>;

inline SoftmaxFwdParams softmax_fwd_params(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                                           uintptr_t lse, const Shape4& q_size,
                                           const Shape4& q_stride, const Shape4& k_size,
                                           const Shape4& k_stride, const Shape4& v_size,
                                           const Shape4& v_stride, const Shape4& out_stride,
                                           const std::array<int64_t, 3>& lse_stride, float scale,
                                           bool causal, int64_t window_left, int64_t window_right,
                                           float softcap) {
  SoftmaxFwdParams p;
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.out = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<float*>(lse);
  p.batch = q_size[0];
  p.heads_q = q_size[1];
  p.seq_q = q_size[2];
  p.head_dim = q_size[3];
  p.heads_kv = k_size[1];
  p.seq_k = k_size[2];
  p.head_dim_v = v_size[3];
  for (int d = 0; d < 4; ++d) {
    p.q_stride[d] = q_stride[d];
    p.k_stride[d] = k_stride[d];
    p.v_stride[d] = v_stride[d];
    p.out_stride[d] = out_stride[d];
  }
  for (int d = 0; d < 3; ++d) p.lse_stride[d] = lse_stride[d];
  p.scale = scale;
  p.causal = causal;
  p.window_left = window_left;
  p.window_right = window_right;
  p.softcap = softcap;
  return p;
}

}  // namespace pyattn
