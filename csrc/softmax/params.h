// Arguments of the fused softmax attention forward, shared by the CPU and CUDA kernels.
//
// The compiled modules never see torch tensors: the Python launcher hands over data
// pointers, sizes and element strides, already validated (see pyattn/ops). Everything
// here is plain data so that the same struct crosses into .cu files without pybind11.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PYATTN_HOST_DEVICE __host__ __device__
#else
#define PYATTN_HOST_DEVICE
#endif

namespace pyattn {

struct SoftmaxFwdParams {
  // q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), out (B, Hq, Sq, Dv) in the
  // input dtype; lse (B, Hq, Sq) float32, may be null (not written).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;

  int64_t batch = 0, heads_q = 0, heads_kv = 0, seq_q = 0, seq_k = 0, head_dim = 0, head_dim_v = 0;

  // Element strides, outermost first; any value is allowed (0 for broadcast dims,
  // a (B, S, H, D) buffer seen through .transpose(1, 2), ...).
  int64_t q_stride[4] = {0, 0, 0, 0};
  int64_t k_stride[4] = {0, 0, 0, 0};
  int64_t v_stride[4] = {0, 0, 0, 0};
  int64_t out_stride[4] = {0, 0, 0, 0};
  int64_t lse_stride[3] = {0, 0, 0};

  float scale = 1.0f;    // applied to q.k before the softcap
  float softcap = 0.0f;  // > 0: s = softcap * tanh(s / softcap)
  bool causal = false;   // bottom-right aligned: j <= i + seq_k - seq_q
  int64_t window_left = -1, window_right = -1;  // -1: unbounded

  // Visible keys of query row i are [key_lo(i), key_hi(i)] (empty when lo > hi).
  PYATTN_HOST_DEVICE int64_t key_lo(int64_t i) const {
    int64_t lo = window_left >= 0 ? i + seq_k - seq_q - window_left : 0;
    return lo < 0 ? 0 : lo;
  }
  PYATTN_HOST_DEVICE int64_t key_hi(int64_t i) const {
    int64_t hi = seq_k - 1;
    const int64_t diag = i + seq_k - seq_q;
    if (causal && diag < hi) hi = diag;
    if (window_right >= 0 && diag + window_right < hi) hi = diag + window_right;
    return hi;
  }
};

}  // namespace pyattn
