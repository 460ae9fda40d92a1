// Merging softmax attention computed over disjoint key sets ("splits") of one query row:
// the arithmetic of the split-KV decoding combine (attention_cuda_decode.cu), and a host
// version of the whole combine (merge_split_rows) that the bindings expose for CPU tests.
// Plain C++: the small functions are PYATTN_HOST_DEVICE so the CUDA kernel and the host loop
// share one implementation of the math.
//
// Split s saw keys K_s and reports lse_s = log sum_{j in K_s} exp(s_j) (natural log; -inf
// when it saw no key) and o_s = sum_j exp(s_j - lse_s) v_j. Over all keys:
//   lse = log sum_s exp(lse_s) = M + log sum_s exp(lse_s - M)   (M = max_s lse_s: no overflow)
//   out = sum_s exp(lse_s - lse) * o_s
// All splits -inf: lse = -inf and out = 0. A -inf split gets weight exactly 0 and its o_s is
// never read into the sum, so neither -inf - -inf nor 0 * garbage can make a NaN.
#pragma once

#include <cmath>
#include <cstdint>

#include "params.h"

namespace pyattn {
namespace cuda {

// The stabiliser M: the largest split lse, or 0 when every split is -inf (then every term
// below is exp(-inf) = 0 instead of exp(-inf - -inf) = NaN).
PYATTN_HOST_DEVICE inline float lse_merge_shift(float max_lse) {
  return max_lse == -INFINITY ? 0.0f : max_lse;
}

// exp(lse_s - M): split s's share of sum_s exp(lse_s), scaled by exp(-M). 0 for lse_s = -inf.
PYATTN_HOST_DEVICE inline float lse_merge_term(float lse_s, float shift) { return expf(lse_s - shift); }

// lse = M + log(sum of the terms); -inf when no split saw a key (the sum is 0).
PYATTN_HOST_DEVICE inline float lse_merge_total(float shift, float sum_terms) {
  return sum_terms > 0.0f ? shift + logf(sum_terms) : -INFINITY;
}

// Weight of split s in the merged output: exp(lse_s - lse), 0 for an empty split or row.
PYATTN_HOST_DEVICE inline float lse_merge_weight(float lse_s, float lse) {
  return (lse == -INFINITY || lse_s == -INFINITY) ? 0.0f : expf(lse_s - lse);
}

// acc + weight * o_s, skipping o_s entirely when its weight is 0.
PYATTN_HOST_DEVICE inline float lse_merge_accumulate(float acc, float weight, float o_s) {
  return weight == 0.0f ? acc : acc + weight * o_s;
}

// Host combine of `rows` rows: part_lse [splits][rows], part_out [splits][rows][dv] (float32,
// contiguous) -> lse [rows], out [rows][dv]. The same steps as the CUDA combine kernel, one
// row at a time.
inline void merge_split_rows(int splits, int64_t rows, int dv, const float* part_lse, const float* part_out,
                             float* lse, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    float max_lse = -INFINITY;
    for (int s = 0; s < splits; ++s) max_lse = std::fmax(max_lse, part_lse[s * rows + r]);
    const float shift = lse_merge_shift(max_lse);
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += lse_merge_term(part_lse[s * rows + r], shift);
    const float total = lse_merge_total(shift, sum);
    lse[r] = total;
    for (int d = 0; d < dv; ++d) out[r * dv + d] = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float w = lse_merge_weight(part_lse[s * rows + r], total);
      const float* o = part_out + (s * rows + r) * dv;
      for (int d = 0; d < dv; ++d) out[r * dv + d] = lse_merge_accumulate(out[r * dv + d], w, o[d]);
    }
  }
}

}  // namespace cuda
}  // namespace pyattn
