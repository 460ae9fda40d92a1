// Arguments of the CPU linear-recurrent attention (shared/API.md section 2), forward and
// backward. Plain data: the Python launcher hands over pointers, sizes and element strides
// of tensors that pyattn.ops.linear has already validated.
#pragma once

#include <cstdint>

namespace pyattn {

struct LinearFwdParams {
  // q (B, Hq, S, F), k (B, Hkv, S, F), v (B, Hkv, S, Dv), out (B, Hq, S, Dv) in `dtype`
  // (0 float32, 1 float16, 2 bfloat16); query head h reads kv head h / (Hq / Hkv).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;  // null: not written (the backward's recomputation)
  // log_decay (B, Hq, S) float32, any strides (0 for a per-head or global constant); null: none.
  const float* log_decay = nullptr;
  // Initial state S (B, Hq, F, Dv) and z (B, Hq, F), float32; null: zeros.
  const float* state_s = nullptr;
  const float* state_z = nullptr;
  // Final state, same shapes; null: not written.
  float* final_s = nullptr;
  float* final_z = nullptr;

  int64_t batch = 0, heads_q = 0, heads_kv = 0, seq = 0, feat = 0, dim_v = 0;
  int64_t q_stride[4] = {0, 0, 0, 0}, k_stride[4] = {0, 0, 0, 0}, v_stride[4] = {0, 0, 0, 0};
  int64_t out_stride[4] = {0, 0, 0, 0};
  int64_t decay_stride[3] = {0, 0, 0};
  int64_t state_s_stride[4] = {0, 0, 0, 0}, state_z_stride[3] = {0, 0, 0};
  int64_t final_s_stride[4] = {0, 0, 0, 0}, final_z_stride[3] = {0, 0, 0};

  enum FeatureMap : int { kIdentity = 0, kElu = 1, kRelu = 2 };  // kElu: elu(x) + 1
  int dtype = 0;
  int feature_map = kIdentity;
  bool causal = true;
  bool normalize = true;
  float scale = 1.0f;  // qf = f(q) * scale
  float eps = 1e-6f;
};

// Backward: fwd holds the forward's inputs (its out / final_* are ignored).
struct LinearBwdParams {
  LinearFwdParams fwd;
  const void* dout = nullptr;  // (B, Hq, S, Dv), dtype fwd.dtype; null: zero
  int64_t dout_stride[4] = {0, 0, 0, 0};
  // Gradients of the final state, float32; null: zero.
  const float* dfinal_s = nullptr;
  const float* dfinal_z = nullptr;
  int64_t dfinal_s_stride[4] = {0, 0, 0, 0}, dfinal_z_stride[3] = {0, 0, 0};
  // dq, dk, dv: shapes of q, k, v, dtype fwd.dtype, any strides (not null).
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dq_stride[4] = {0, 0, 0, 0}, dk_stride[4] = {0, 0, 0, 0}, dv_stride[4] = {0, 0, 0, 0};
  // (B, Hq, S) float32 gradient of the per-token log decay; null: not computed.
  float* dlog_decay = nullptr;
  int64_t dlog_decay_stride[3] = {0, 0, 0};
  // Gradients of the initial state, float32; null: not computed.
  float* dstate_s = nullptr;
  float* dstate_z = nullptr;
  int64_t dstate_s_stride[4] = {0, 0, 0, 0}, dstate_z_stride[3] = {0, 0, 0};
};

}  // namespace pyattn
