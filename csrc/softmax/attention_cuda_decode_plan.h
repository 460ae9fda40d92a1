// Launch plan of the split-KV ("flash-decoding") softmax forward (attention_cuda_decode.cu):
// tile constants, the shared-memory layout, the key range and its split into chunks, and the
// split-count heuristic. Plain C++ so the plan is unit-tested on a machine without a GPU; the
// kernel file includes this header and uses the same functions, so both agree by construction.
//
// Mapping: one CTA serves kDecodeRows "rows" of one (batch, kv head) and one key chunk (split).
// The rows of a kv head are its group = heads_q / heads_kv query heads times seq_q queries,
// row r = g * seq_q + i (query head kvh * group + g, query i); more than kDecodeRows rows are cut
// into row blocks (the CTAs of one chunk's row blocks are adjacent in the grid, so the second
// and later reads of that K/V chunk mostly come from L2). CTA index, innermost first:
// row block, split, kv head, batch (a 1-D grid walked with a grid-stride loop).
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common/cuda_plan.h"
#include "params.h"

namespace pyattn {
namespace cuda {

constexpr int kDecodeMaxQueries = 16;        // seq_q this kernel takes
constexpr int kDecodeThreads = 128;          // 4 warps per CTA
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr int kDecodeRows = 16;              // (query head, query) rows per CTA
constexpr int kDecodeTileBytes = 16 * 1024;  // one K tile plus one V tile, in the input dtype
constexpr int kDecodeMaxSplits = 128;        // the combine keeps one weight per split in smem
constexpr int64_t kDecodeMinKeysPerSplit = 256;  // below this a split's fixed costs dominate
constexpr int kDecodeWaves = 2;              // target: this many waves of resident CTAs
constexpr int kDecodeMaxCtasPerSm = 4;       // residency assumed by the heuristic (registers)
constexpr int kDecodeCombineWarps = 4;       // combine kernel: one warp per output row

inline int decode_elem_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// Keys per tile: kDecodeTileBytes of K and V together (bucket 128 in 16-bit: 32 keys), at
// least 16 (float32 bucket 256: 16 keys, 32 KiB). Always a multiple of 16 between 16 and 128.
constexpr int decode_tile_keys(int elem_bytes, int bucket) {
  return kDecodeTileBytes / (2 * bucket * elem_bytes) < 16    ? 16
         : kDecodeTileBytes / (2 * bucket * elem_bytes) > 128 ? 128
                                                              : kDecodeTileBytes / (2 * bucket * elem_bytes);
}

// Shared memory of the split kernel, byte offsets. Two stages (double buffer: tile t + 1 is
// copied in while tile t is computed), each a K tile [keys][bucket] then a V tile
// [keys][bucket] in T. K rows are padded by 16 bytes so that the 8 lanes of a quarter warp
// reading 16 bytes of 8 consecutive keys hit 8 distinct bank quads; the score rows are padded
// by 4 floats for the same reason (rows read as float4 in the P.V step). Every region starts
// 16-byte aligned.
struct DecodeSmemLayout {
  int tile_keys;
  int64_t k_row_bytes, v_row_bytes, p_row_floats;
  int64_t stage_bytes;  // stage s starts at s * stage_bytes
  int64_t k_off, v_off;  // within a stage
  int64_t q_off, p_off, key_lo_off, key_hi_off, alpha_off, m_off, l_off, total;
};

constexpr DecodeSmemLayout decode_smem_layout(int elem_bytes, int bucket) {
  DecodeSmemLayout s{};
  s.tile_keys = decode_tile_keys(elem_bytes, bucket);
  s.k_row_bytes = int64_t(bucket) * elem_bytes + 16;
  s.v_row_bytes = int64_t(bucket) * elem_bytes;
  s.p_row_floats = s.tile_keys + 4;
  s.k_off = 0;
  s.v_off = s.tile_keys * s.k_row_bytes;
  s.stage_bytes = s.v_off + s.tile_keys * s.v_row_bytes;
  s.q_off = 2 * s.stage_bytes;                                  // q rows [rows][bucket] float, pre-scaled
  s.p_off = s.q_off + int64_t(kDecodeRows) * bucket * 4;        // scores / probabilities [rows][keys+4]
  s.key_lo_off = s.p_off + int64_t(kDecodeRows) * s.p_row_floats * 4;  // int64 per row
  s.key_hi_off = s.key_lo_off + kDecodeRows * 8;                       // int64 per row
  s.alpha_off = s.key_hi_off + kDecodeRows * 8;                        // tile rescale per row
  s.m_off = s.alpha_off + kDecodeRows * 4;                             // final running max (log2)
  s.l_off = s.m_off + kDecodeRows * 4;                                 // final running sum
  s.total = s.l_off + kDecodeRows * 4;
  return s;
}

// Resident CTAs per SM: shared memory (with the ~1 KiB per CTA the hardware reserves) and at
// most kDecodeMaxCtasPerSm (the kernel's __launch_bounds__ hold it to 65536 / (128 * that)
// registers a thread, 128 at 4). The kernel uses the same function for its launch bounds.
constexpr int decode_ctas_per_sm(int64_t smem_bytes, int64_t max_smem) {
  return max_smem / (smem_bytes + 1024) < 1                     ? 1
         : max_smem / (smem_bytes + 1024) > kDecodeMaxCtasPerSm ? kDecodeMaxCtasPerSm
                                                                : static_cast<int>(max_smem / (smem_bytes + 1024));
}

// (query head, query) rows per kv head, and the row blocks of kDecodeRows they make.
inline int64_t decode_group_rows(const SoftmaxFwdParams& p) {
  return p.heads_kv > 0 ? (p.heads_q / p.heads_kv) * p.seq_q : 0;
}
inline int64_t decode_row_blocks(const SoftmaxFwdParams& p) {
  return (decode_group_rows(p) + kDecodeRows - 1) / kDecodeRows;
}

// Keys [begin, end) that at least one query row can see: the union of [key_lo(i), key_hi(i)]
// (the rows' ranges are shifted copies of one another, so the union has no hole that matters:
// keys inside it a row cannot see are masked). {0, 0} when no row sees a key (seq_k = 0, ...).
struct DecodeKeyRange {
  int64_t begin = 0, end = 0;
};

inline DecodeKeyRange decode_key_range(const SoftmaxFwdParams& p) {
  DecodeKeyRange r;
  bool any = false;
  for (int64_t i = 0; i < p.seq_q; ++i) {
    const int64_t lo = p.key_lo(i), hi = p.key_hi(i);
    if (lo > hi) continue;
    r.begin = any ? std::min(r.begin, lo) : lo;
    r.end = any ? std::max(r.end, hi + 1) : hi + 1;
    any = true;
  }
  return any ? r : DecodeKeyRange{};
}

// Split heuristic. `ctas` CTAs exist without splitting (batch * heads_kv * row blocks), each
// streaming `keys` keys. Split until about kDecodeWaves waves of resident CTAs
// (ctas_per_sm each on num_sms SMs) exist, keeping at least kDecodeMinKeysPerSplit keys per
// split and at most kDecodeMaxSplits splits. 1 when the keys are few or the rows already fill
// the GPU.
inline int decode_num_splits(int64_t ctas, int64_t keys, int num_sms, int ctas_per_sm) {
  if (ctas <= 0 || keys <= 0) return 1;
  const int64_t target = int64_t(kDecodeWaves) * std::max(1, num_sms) * std::max(1, ctas_per_sm);
  const int64_t want = (target + ctas - 1) / ctas;
  const int64_t by_keys = keys / kDecodeMinKeysPerSplit;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, by_keys, kDecodeMaxSplits})));
}

// Keys per split for `splits` splits of `keys` keys: a multiple of the tile, so that only a
// chunk's last tile is partial. With chunk = decode_split_chunk(keys, s, tile), the splits that
// actually hold keys are decode_splits_used(keys, chunk) <= s, and recomputing the chunk from
// that count gives the same chunk (the launcher relies on it: it sees only the count).
inline int64_t decode_split_chunk(int64_t keys, int splits, int tile_keys) {
  if (keys <= 0) return tile_keys;
  const int64_t per = (keys + splits - 1) / splits;
  return (per + tile_keys - 1) / tile_keys * tile_keys;
}
inline int decode_splits_used(int64_t keys, int64_t chunk) {
  return keys <= 0 ? 1 : static_cast<int>((keys + chunk - 1) / chunk);
}

// Workspace of num_splits > 1: partial outputs [splits][rows][head_dim_v] then partial lse
// [splits][rows], rows = batch * heads_q * seq_q in (b, h, i) order (the layout
// merge_split_rows in lse_merge.h takes).
inline int64_t decode_workspace_floats(const SoftmaxFwdParams& p, int splits) {
  if (splits <= 1) return 0;
  const int64_t rows = p.batch * p.heads_q * p.seq_q;
  return int64_t(splits) * rows * (p.head_dim_v + 1);
}

inline LaunchPlan plan_softmax_decode(const SoftmaxFwdParams& p, DType dtype, const DeviceInfo& dev) {
  LaunchPlan plan;
  plan.kernel = "softmax_decode";
  plan.block = kDecodeThreads;
  plan.head_dim_bucket = head_dim_bucket(std::max(p.head_dim, p.head_dim_v));
  if (p.bias != nullptr || p.dropout_p > 0.0f || p.cu_seqlens_q != nullptr || p.cu_seqlens_k != nullptr) {
    plan.error = "softmax_decode takes no attn_bias, dropout or packed (varlen) batch";
    return plan;
  }
  if (p.seq_q > kDecodeMaxQueries) {
    plan.error = "softmax_decode takes at most 16 queries per head";
    return plan;
  }
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) {
    plan.error = "softmax_decode needs heads_q to be a multiple of heads_kv";
    return plan;
  }
  if (plan.head_dim_bucket == 0) {
    plan.error = "softmax_decode takes head dims 1..256";
    return plan;
  }
  if (dev.sm_major < 8) {
    plan.error = "softmax_decode needs compute capability 8.0 or newer";
    return plan;
  }
  const int elem = decode_elem_bytes(dtype);
  const DecodeSmemLayout smem = decode_smem_layout(elem, plan.head_dim_bucket);
  plan.smem_bytes = smem.total;
  if (plan.smem_bytes > dev.max_smem_optin) {
    plan.error = "softmax_decode's shared memory exceeds the device's";
    return plan;
  }
  const int64_t ctas = p.batch * p.heads_kv * decode_row_blocks(p);
  if (ctas <= 0) {
    plan.grid[0] = 0;  // no query row: nothing to compute
    return plan;
  }
  const DecodeKeyRange range = decode_key_range(p);
  const int64_t keys = range.end - range.begin;
  const int ctas_per_sm = decode_ctas_per_sm(smem.total, dev.max_smem_optin);
  const int want = decode_num_splits(ctas, keys, dev.num_sms, ctas_per_sm);
  const int64_t chunk = decode_split_chunk(keys, want, smem.tile_keys);
  plan.num_splits = decode_splits_used(keys, chunk);
  plan.grid[0] = std::min<int64_t>(ctas * plan.num_splits, kMaxGridX);
  plan.workspace_floats = decode_workspace_floats(p, plan.num_splits);
  return plan;
}

}  // namespace cuda
}  // namespace pyattn
