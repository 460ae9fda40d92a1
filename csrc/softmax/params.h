// Arguments of the fused softmax attention: the forward's, shared by the CPU and CUDA
// kernels, and the backward's (CPU kernels).
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

  // ---- Read by the CPU kernels only. The CUDA launcher leaves these at their defaults and
  // pyattn.dispatch.cuda sends it no call that needs them (its dtype is a launch argument).

  // dtype of q, k, v, out (and of the backward's dout, dq, dk, dv): 0 float32, 1 float16,
  // 2 bfloat16.
  int dtype = 0;

  // attn_bias, element (b, h, i, j) at bias[b*s0 + h*s1 + i*s2 + j*s3] (stride 0 on broadcast
  // dims), applied after the softcap: kBiasFloat adds a float32 value, kBiasBool keeps the
  // scores where a bool (one byte) is true.
  enum BiasKind : int { kBiasNone = 0, kBiasFloat = 1, kBiasBool = 2 };
  const void* bias = nullptr;
  int bias_kind = kBiasNone;
  int64_t bias_stride[4] = {0, 0, 0, 0};

  // Dropout on the probabilities (after the lse): entry (b, h, i, j) is kept iff
  // (philox4x32_10(seed, offset) >> 8) >= dropout_threshold, where
  // offset = dropout_offset + b*s0 + h*s1 + i*s2 + j, and kept ones are scaled by 1/(1-p).
  float dropout_p = 0.0f;  // 0: no dropout
  uint32_t dropout_threshold = 0;
  uint64_t dropout_seed = 0;
  int64_t dropout_offset = 0;
  int64_t dropout_stride[3] = {0, 0, 0};

  // Packed variable-length batch (null: dense). Sequence b is rows [cu_seqlens_q[b],
  // cu_seqlens_q[b+1]) of q, out and lse along their dim 2 (stride[2]), and rows
  // [cu_seqlens_k[b], cu_seqlens_k[b+1]) of k and v; dim 0 strides are then 0, batch is the
  // number of sequences and seq_q / seq_k are upper bounds of their lengths. The dropout
  // offset of sequence b starts at cu_seqlens_q[b] * dropout_stride[2] + cu_seqlens_k[b].
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;

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

// Arguments of the backward (CPU kernels). fwd holds the forward's inputs and features, with
// fwd.out the forward's output and fwd.lse its log-sum-exp (both read here).
struct SoftmaxBwdParams {
  SoftmaxFwdParams fwd;
  const void* dout = nullptr;  // (B, Hq, Sq, Dv), dtype fwd.dtype
  int64_t dout_stride[4] = {0, 0, 0, 0};
  const float* dlse = nullptr;  // (B, Hq, Sq) gradient of the lse; null: zero
  int64_t dlse_stride[3] = {0, 0, 0};
  void* dq = nullptr;  // dq, dk, dv: shapes of q, k, v, dtype fwd.dtype, any strides
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dq_stride[4] = {0, 0, 0, 0};
  int64_t dk_stride[4] = {0, 0, 0, 0};
  int64_t dv_stride[4] = {0, 0, 0, 0};
  float* dbias = nullptr;  // (B, Hq, Sq, Sk) float32 gradient of the final scores; null: unwanted
  int64_t dbias_stride[4] = {0, 0, 0, 0};
};

}  // namespace pyattn
