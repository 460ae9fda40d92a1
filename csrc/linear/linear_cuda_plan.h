// Launch plans of the CUDA linear-recurrent attention kernels (linear_cuda_{fwd,bwd,decode}.cu)
// and the shared-memory layouts those kernels carve, in plain C++ (no CUDA headers): the
// plans are unit-tested on machines without a GPU, and the kernels size and carve their
// dynamic shared memory with these same functions, so plan and launch cannot disagree.
//
// Kernels (all causal; non-causal calls get an error plan):
//   linear_chunk_fwd     a states-only sweep, one CTA per (batch * query head, 64-column
//                        value tile) sequential over chunks of kFwdChunk tokens with the
//                        F x 64 float32 state in smem, then every chunk's output in parallel;
//                        for very many heads, one sequential pass doing both.
//   linear_recurrent_fwd one CTA per (batch * query head, 32-column value tile), the state
//                        slice in registers, a loop over <= kRecurrentMaxSeq tokens.
//   linear_chunk_bwd     (1) the forward sweep storing the state entering every chunk (and the
//                        per-token normalizer terms) in the workspace; (2) the reverse sweep
//                        storing the gradient of the state leaving every chunk; (3) one CTA
//                        per (batch * query head, chunk) for dq, dk, dv, dlog_decay; (4) for
//                        GQA, a kernel summing the per-query-head float32 dk / dv partials.
#pragma once

#include <cstdint>
#include <string>

#include "../common/cuda_plan.h"
#include "linear_params.h"

namespace pyattn {
namespace cuda {

constexpr int kRecurrentMaxSeq = 16;  // at most this many tokens: the token loop (decoding)

constexpr int kLinThreads = 256;  // chunk kernels: a 16 x 16 grid of threads over each product
constexpr int kFwdChunk = 64;     // tokens per chunk in the forward
constexpr int kFwdBV = 64;        // value columns per forward CTA
constexpr int kRecBV = 32;        // value columns per recurrent CTA (one per lane)
constexpr int kRecWarps = 4;      // recurrent CTA: warp w owns state rows f = w (mod 4)
constexpr int kReduceThreads = 256;

// Backward chunk: 32 tokens, so that the chunk-parallel gradient kernel of the 128 bucket fits
// an sm_80 CTA and that of the 64 bucket runs three CTAs per H100 SM.
constexpr int bwd_chunk(int /*bucket*/) { return 32; }

constexpr int64_t cdiv64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Dynamic shared memory of the chunk-forward kernel (also the backward's state sweep), in
// floats, carved in this order. Row-major tiles with a leading dimension of bucket + 1
// (odd) so that a warp reading one column of 16 rows hits 16 banks. The q tile and A come
// last: a states-only launch needs just the first states_only floats.
struct FwdSmem {
  int64_t k, v, s, lhi, llo, g, w, den, z, scal, states_only, q, a, total;
};
constexpr FwdSmem fwd_smem(int bucket, int chunk) {
  FwdSmem m{};
  int64_t o = 0;
  m.k = o; o += chunk * (bucket + 1);
  m.v = o; o += chunk * kFwdBV;
  m.s = o; o += bucket * kFwdBV;
  m.lhi = o; o += chunk;
  m.llo = o; o += chunk;
  m.g = o; o += chunk;
  m.w = o; o += chunk;
  m.den = o; o += chunk;
  m.z = o; o += bucket;
  m.scal = o; o += 4;
  m.states_only = o;
  m.q = o; o += chunk * (bucket + 1);
  m.a = o; o += chunk * (chunk + 1);
  m.total = o;
  return m;
}

// Dynamic shared memory of the backward's chunk-parallel gradient kernel, in floats (one
// F x Dv tile, so that the 128 bucket fits the 163 KiB of an sm_80 CTA).
struct BwdSmem {
  int64_t q, k, v, dout, s, a, p, m, zc, dz, lhi, llo, g, w, r, dd, qu, dlin, dlout, blk, red,
      scal, total;
};
constexpr BwdSmem bwd_smem(int bucket) {
  const int64_t c = bwd_chunk(bucket), ld = bucket + 1;
  BwdSmem m{};
  int64_t o = 0;
  m.q = o; o += c * ld;
  m.k = o; o += c * ld;
  m.v = o; o += c * ld;
  m.dout = o; o += c * ld;
  m.s = o; o += bucket * ld;  // S_c, then (once U = dout S_c^T is done) dS
  m.a = o; o += c * (c + 1);
  m.p = o; o += c * (c + 1);
  m.m = o; o += c * (c + 1);
  m.zc = o; o += bucket;
  m.dz = o; o += bucket;
  m.lhi = o; o += c;
  m.llo = o; o += c;
  m.g = o; o += c;
  m.w = o; o += c;
  m.r = o; o += c;
  m.dd = o; o += c;
  m.qu = o; o += c;
  m.dlin = o; o += c;
  m.dlout = o; o += c;
  m.blk = o; o += c;
  m.red = o; o += kLinThreads / 32;
  m.scal = o; o += 8;
  m.total = o;
  return m;
}

// Dynamic shared memory of the backward's reverse sweep of the state gradient, in floats.
struct DsweepSmem {
  int64_t q, dout, ds, dz, lhi, llo, g, w, dd, scal, total;
};
constexpr DsweepSmem dsweep_smem(int bucket) {
  const int64_t c = bwd_chunk(bucket);
  DsweepSmem m{};
  int64_t o = 0;
  m.q = o; o += c * (bucket + 1);
  m.dout = o; o += c * kFwdBV;
  m.ds = o; o += bucket * kFwdBV;
  m.dz = o; o += bucket;
  m.lhi = o; o += c;
  m.llo = o; o += c;
  m.g = o; o += c;
  m.w = o; o += c;
  m.dd = o; o += c;
  m.scal = o; o += 4;
  m.total = o;
  return m;
}

// Backward workspace, in floats (bh = B*Hq, nc chunks of bwd_chunk(bucket), nvt = value
// tiles of kFwdBV):
//   states  [bh][nc][F][Dv], zs  [bh][nc][F]   the state entering each chunk
//   dstates [bh][nc][F][Dv], dzs [bh][nc][F]   the gradient of the state leaving each chunk
//   r [bh][S]                                   1 / (den + eps) (1 without normalize)
//   dn [bh][nvt][S]                             per value tile, dout_t . (unnormalized out_t)
//   dk_part [bh][S][F], dv_part [bh][S][Dv]     GQA only: per query head, summed per group
struct BwdWorkspace {
  int64_t states, zs, dstates, dzs, r, dn, dk_part, dv_part, total;
  int64_t nc, nvt;
  bool gqa;
};
inline BwdWorkspace bwd_workspace(const LinearFwdParams& p, int bucket) {
  BwdWorkspace w{};
  const int64_t bh = p.batch * p.heads_q;
  w.nc = cdiv64(p.seq, bwd_chunk(bucket));
  w.nvt = cdiv64(p.dim_v, kFwdBV);
  w.gqa = p.heads_kv > 0 && p.heads_q / p.heads_kv > 1 && p.seq > 0;
  int64_t o = 0;
  w.states = o; o += bh * w.nc * p.feat * p.dim_v;
  w.zs = o; o += bh * w.nc * p.feat;
  w.dstates = o; o += bh * w.nc * p.feat * p.dim_v;
  w.dzs = o; o += bh * w.nc * p.feat;
  w.r = o; o += bh * p.seq;
  w.dn = o; o += bh * w.nvt * p.seq;
  w.dk_part = o; o += w.gqa ? bh * p.seq * p.feat : 0;
  w.dv_part = o; o += w.gqa ? bh * p.seq * p.dim_v : 0;
  w.total = o;
  return w;
}

// Checks shared by the three plans; fills kernel and bucket, or error.
inline LaunchPlan linear_plan_common(const LinearFwdParams& p, const char* kernel) {
  LaunchPlan plan;
  plan.kernel = kernel;
  if (!p.causal) {
    plan.error = std::string(kernel) + ": only causal linear attention runs on CUDA";
    return plan;
  }
  if (p.feat <= 0 || p.dim_v <= 0) {
    plan.error = std::string(kernel) + ": feature and value dims must be positive";
    return plan;
  }
  if (p.heads_q <= 0 || p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) {
    plan.error = std::string(kernel) + ": heads_q must be a positive multiple of heads_kv";
    return plan;
  }
  const int64_t d = p.feat > p.dim_v ? p.feat : p.dim_v;
  const int bucket = head_dim_bucket(d);
  if (bucket == 0 || bucket > 128) {
    plan.error = std::string(kernel) + ": feature / value dim " + std::to_string(d) +
                 " above 128";
    return plan;
  }
  plan.head_dim_bucket = bucket;
  if (p.batch * p.heads_q > kMaxGridX) {
    plan.error = std::string(kernel) + ": batch * heads above the grid limit";
  }
  return plan;
}

inline void check_smem(LaunchPlan& plan, const DeviceInfo& dev) {
  if (plan.ok() && plan.smem_bytes > dev.max_smem_optin) {
    plan.error = plan.kernel + ": needs " + std::to_string(plan.smem_bytes) +
                 " bytes of shared memory, the device allows " + std::to_string(dev.max_smem_optin);
  }
}

// The forward runs in two passes: a states-only sweep (grid (B*Hq, ceil(Dv / 64)), sequential
// over the chunks, a third of the work) saving the state entering every chunk in the
// workspace ([B*Hq][nc][F][Dv] then [B*Hq][nc][F]), then the output of every chunk in
// parallel on grid (B*Hq * nc, ceil(Dv / 64)), the grid reported. The same total work as one
// pass, without its few long sequential CTAs (an idle GPU, or a last wave half empty). One
// pass (grid (B*Hq, ceil(Dv / 64)), no workspace) when that grid is several waves already,
// or the workspace would pass kFwdMaxWorkspaceFloats. workspace_floats > 0 tells the launcher.
constexpr int64_t kFwdMaxWorkspaceFloats = int64_t{1} << 27;  // 512 MiB
constexpr int kFwdOnePassWaves = 4;  // one pass from this many CTAs per SM

inline int64_t fwd_two_pass_floats(const LinearFwdParams& p, const DeviceInfo& dev) {
  const int64_t bh = p.batch * p.heads_q, nc = cdiv64(p.seq, kFwdChunk);
  const int64_t ctas = bh * cdiv64(p.dim_v, kFwdBV);
  if (ctas >= int64_t{kFwdOnePassWaves} * dev.num_sms || nc < 2 || bh > kMaxGridX / nc) return 0;
  const int64_t floats = bh * nc * (p.feat * p.dim_v + p.feat);
  return floats <= kFwdMaxWorkspaceFloats ? floats : 0;
}

inline LaunchPlan plan_linear_chunk_fwd(const LinearFwdParams& p, DType dtype,
                                        const DeviceInfo& dev) {
  (void)dtype;
  LaunchPlan plan = linear_plan_common(p, "linear_chunk_fwd");
  if (!plan.ok()) return plan;
  const int64_t bh = p.batch * p.heads_q, nc = cdiv64(p.seq, kFwdChunk);
  plan.grid[0] = bh;
  plan.grid[1] = cdiv64(p.dim_v, kFwdBV);
  plan.grid[2] = 1;
  plan.workspace_floats = fwd_two_pass_floats(p, dev);
  if (plan.workspace_floats > 0) plan.grid[0] = bh * nc;
  plan.block = kLinThreads;
  plan.smem_bytes = fwd_smem(plan.head_dim_bucket, kFwdChunk).total * 4;
  check_smem(plan, dev);
  return plan;
}

inline LaunchPlan plan_linear_recurrent_fwd(const LinearFwdParams& p, DType dtype,
                                            const DeviceInfo& dev) {
  (void)dtype;
  (void)dev;  // static smem only: fits every device
  LaunchPlan plan = linear_plan_common(p, "linear_recurrent_fwd");
  if (!plan.ok()) return plan;
  if (p.seq > kRecurrentMaxSeq) {
    plan.error = "linear_recurrent_fwd: at most " + std::to_string(kRecurrentMaxSeq) +
                 " tokens, got " + std::to_string(p.seq);
    return plan;
  }
  plan.grid[0] = p.batch * p.heads_q;
  plan.grid[1] = cdiv64(p.dim_v, kRecBV);
  plan.grid[2] = 1;
  plan.block = kRecBV * kRecWarps;
  plan.smem_bytes = 0;  // static shared memory only
  plan.workspace_floats = 0;
  return plan;
}

// The backward runs four kernels (linear_cuda_bwd.cu): the forward state sweep and the
// state-gradient sweep on grid (B*Hq, ceil(Dv / 64)), then the chunk-parallel gradient kernel
// on B*Hq * nc CTAs, then (GQA) the group reduction. grid = {B*Hq * nc, 1, 1} (B*Hq when
// S = 0: the state-gradient sweep still runs); block and smem_bytes are the largest of the
// kernels'.
inline LaunchPlan plan_linear_chunk_bwd(const LinearBwdParams& bp, DType dtype,
                                        const DeviceInfo& dev) {
  (void)dtype;
  const LinearFwdParams& p = bp.fwd;
  LaunchPlan plan = linear_plan_common(p, "linear_chunk_bwd");
  if (!plan.ok()) return plan;
  const int bucket = plan.head_dim_bucket;
  const BwdWorkspace ws = bwd_workspace(p, bucket);
  const int64_t bh = p.batch * p.heads_q;
  if (ws.nc > 0 && bh > kMaxGridX / ws.nc) {
    plan.error = "linear_chunk_bwd: batch * heads * chunks above the grid limit";
    return plan;
  }
  plan.grid[0] = ws.nc > 0 ? bh * ws.nc : bh;
  plan.grid[1] = 1;
  plan.grid[2] = 1;
  plan.block = kLinThreads;
  int64_t smem = fwd_smem(bucket, bwd_chunk(bucket)).total;
  if (dsweep_smem(bucket).total > smem) smem = dsweep_smem(bucket).total;
  if (bwd_smem(bucket).total > smem) smem = bwd_smem(bucket).total;
  plan.smem_bytes = smem * 4;
  plan.workspace_floats = ws.total;
  check_smem(plan, dev);
  return plan;
}

}  // namespace cuda
}  // namespace pyattn
