// Dispatcher of the CPU linear attention: picks the head kernels for this CPU (following
// the softmax kernels' set_isa), runs one (batch, query head) per work item on the thread
// pool, and for GQA sums the query heads' dk / dv contributions per kv head.

#include "linear_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "../common/parallel.h"
#include "../common/scratch.h"
#include "../softmax/attention_cpu.h"

namespace pyattn {
namespace cpu {
namespace {

const LinearIsaKernel* by_name(const char* name) {
#if defined(PYATTN_HAVE_AVX512)
  if (std::strcmp(name, linear_kernel_avx512().name) == 0) return &linear_kernel_avx512();
#endif
#if defined(PYATTN_HAVE_AVX2)
  if (std::strcmp(name, linear_kernel_avx2().name) == 0) return &linear_kernel_avx2();
#endif
  if (std::strcmp(name, linear_kernel_base().name) == 0) return &linear_kernel_base();
  return nullptr;
}

// The best variant this CPU runs: the softmax dispatcher knows which those are.
const LinearIsaKernel& best_kernel() {
  const IsaKernel* kernels[3];
  const int n = available_isas(kernels, 3);
  for (int i = 0; i < n; ++i) {
    const LinearIsaKernel* k = by_name(kernels[i]->name);
    if (k != nullptr) return *k;
  }
  return linear_kernel_base();
}

// FLOPs of one head's forward (chunk products plus state updates), for the thread count.
double head_flops(const LinearFwdParams& p) {
  const double c = 64.0, f = static_cast<double>(p.feat), dv = static_cast<double>(p.dim_v);
  return static_cast<double>(p.seq) * (4.0 * f * dv + c * (f + dv)) + 2.0 * f * dv;
}

// Bytes a forward reads and writes: q, k, v, out and the float32 state of each query head.
double forward_bytes(const LinearFwdParams& p) {
  const double es = p.dtype == 0 ? 4.0 : 2.0, f = static_cast<double>(p.feat);
  const double dv = static_cast<double>(p.dim_v), s = static_cast<double>(p.seq);
  const double bq = static_cast<double>(p.batch * p.heads_q);
  const double bkv = static_cast<double>(p.batch * p.heads_kv);
  return es * s * (bq * (f + dv) + bkv * (f + dv)) + 4.0 * bq * f * (dv + 1.0);
}

struct FwdJob {
  const LinearFwdParams* p;
  const LinearIsaKernel* kernel;
  float* scratch;
  size_t stride;
};

void fwd_item(void* ctx, int64_t item, int worker) {
  const FwdJob& job = *static_cast<const FwdJob*>(ctx);
  job.kernel->fwd_head(*job.p, item / job.p->heads_q, item % job.p->heads_q,
                       job.scratch + worker * job.stride);
}

// ---------------------------------------------------------------- split sequences
// Fewer (batch, head) items than threads (forward, causal): each head's sequence is cut into
// segments. Pass 1 runs every segment but the last from a zero state and keeps only its final
// state (no outputs); the states entering the segments then follow from
// S_in(j+1) = exp(sum of the segment's log decays) S_in(j) + dS_j, and pass 2 runs every segment
// from its entering state with outputs. ~1.3x the work, spread over the segments.

constexpr int64_t kMinSegment = 256;  // tokens

struct SplitJob {
  const LinearFwdParams* p;
  const LinearIsaKernel* kernel;
  float* scratch;
  size_t stride;
  int64_t n_seg, seg_len, state_floats;
  float* states;  // [item][segment]: S (F x Dv) then z (F)
  bool outputs;   // pass 2
};

float* segment_state(const SplitJob& job, int64_t item, int64_t seg) {
  return job.states + (item * job.n_seg + seg) * job.state_floats;
}

void split_item(void* ctx, int64_t work, int worker) {
  const SplitJob& job = *static_cast<const SplitJob*>(ctx);
  const LinearFwdParams& p = *job.p;
  const int64_t item = work / job.n_seg, seg = work % job.n_seg;
  if (!job.outputs && seg == job.n_seg - 1) return;  // nothing follows the last segment
  const int64_t t0 = seg * job.seg_len, es = p.dtype == 0 ? 4 : 2;
  LinearFwdParams sp = p;
  sp.seq = std::min(job.seg_len, p.seq - t0);
  sp.q = static_cast<const char*>(p.q) + t0 * p.q_stride[2] * es;
  sp.k = static_cast<const char*>(p.k) + t0 * p.k_stride[2] * es;
  sp.v = static_cast<const char*>(p.v) + t0 * p.v_stride[2] * es;
  if (p.log_decay != nullptr) sp.log_decay = p.log_decay + t0 * p.decay_stride[2];
  float* state = segment_state(job, item, seg);
  // A segment's own state lives in `state`: strides 0 on (batch, head)
  const int64_t s_stride[4] = {0, 0, p.dim_v, 1}, z_stride[3] = {0, 0, 1};
  if (job.outputs) {
    sp.out = p.out != nullptr ? static_cast<char*>(p.out) + t0 * p.out_stride[2] * es : nullptr;
    sp.state_s = state;
    sp.state_z = state + p.feat * p.dim_v;
    std::copy(s_stride, s_stride + 4, sp.state_s_stride);
    std::copy(z_stride, z_stride + 3, sp.state_z_stride);
    if (seg != job.n_seg - 1) sp.final_s = sp.final_z = nullptr;
  } else {
    sp.out = nullptr;
    sp.state_s = sp.state_z = nullptr;
    sp.final_s = state;
    sp.final_z = state + p.feat * p.dim_v;
    std::copy(s_stride, s_stride + 4, sp.final_s_stride);
    std::copy(z_stride, z_stride + 3, sp.final_z_stride);
  }
  job.kernel->fwd_head(sp, item / p.heads_q, item % p.heads_q, job.scratch + worker * job.stride);
}

// Between the passes: segment states (pass 1: each segment's own) -> the states entering them.
void chain_states(const SplitJob& job, int64_t item) {
  const LinearFwdParams& p = *job.p;
  const int64_t b = item / p.heads_q, h = item % p.heads_q, F = p.feat, Dv = p.dim_v;
  std::vector<float> cur(static_cast<size_t>(job.state_floats), 0.0f), own(cur.size());
  if (p.state_s != nullptr) {
    const float* s0 = p.state_s + b * p.state_s_stride[0] + h * p.state_s_stride[1];
    const float* z0 = p.state_z + b * p.state_z_stride[0] + h * p.state_z_stride[1];
    for (int64_t f = 0; f < F; ++f) {
      for (int64_t j = 0; j < Dv; ++j) cur[f * Dv + j] = s0[f * p.state_s_stride[2] + j * p.state_s_stride[3]];
      cur[F * Dv + f] = z0[f * p.state_z_stride[2]];
    }
  }
  for (int64_t seg = 0; seg < job.n_seg; ++seg) {
    float* state = segment_state(job, item, seg);
    std::copy(state, state + job.state_floats, own.begin());
    std::copy(cur.begin(), cur.end(), state);
    if (seg == job.n_seg - 1) break;
    double log_total = 0.0;  // the kernels clamp each log decay the same way
    if (p.log_decay != nullptr) {
      const float* ld = p.log_decay + b * p.decay_stride[0] + h * p.decay_stride[1];
      const int64_t t0 = seg * job.seg_len, t1 = std::min(p.seq, t0 + job.seg_len);
      for (int64_t t = t0; t < t1; ++t) log_total += std::max(ld[t * p.decay_stride[2]], -1e4f);
    }
    const float g = static_cast<float>(std::exp(log_total));
    for (size_t i = 0; i < cur.size(); ++i) cur[i] = g * cur[i] + own[i];
  }
}

struct BwdJob {
  const LinearBwdParams* p;
  const LinearIsaKernel* kernel;
  float* scratch;
  size_t stride;
  float *dk_part, *dv_part;  // GQA: [B][Hq][S][F] and [B][Hq][S][Dv] float32
  int64_t group, reduce_rows, reduce_blocks;
};

void bwd_item(void* ctx, int64_t item, int worker) {
  const BwdJob& job = *static_cast<const BwdJob*>(ctx);
  const LinearFwdParams& p = job.p->fwd;
  float *dk = nullptr, *dv = nullptr;
  if (job.dk_part != nullptr) {
    dk = job.dk_part + item * p.seq * p.feat;
    dv = job.dv_part + item * p.seq * p.dim_v;
  }
  job.kernel->bwd_head(*job.p, item / p.heads_q, item % p.heads_q,
                       job.scratch + worker * job.stride, dk, dv);
}

// Rows [t0, t0 + reduce_rows) of dk and dv of one (batch, kv head): the sum over its group.
void reduce_item(void* ctx, int64_t item, int worker) {
  const BwdJob& job = *static_cast<const BwdJob*>(ctx);
  const LinearBwdParams& bp = *job.p;
  const LinearFwdParams& p = bp.fwd;
  const int64_t block = item % job.reduce_blocks, pair = item / job.reduce_blocks;
  const int64_t b = pair / p.heads_kv, kvh = pair % p.heads_kv;
  const int64_t t0 = block * job.reduce_rows, n = std::min(job.reduce_rows, p.seq - t0);
  float* sum = job.scratch + worker * job.stride;
  const int64_t es = p.dtype == 0 ? 4 : 2;
  for (int which = 0; which < 2; ++which) {
    const int64_t cols = which == 0 ? p.feat : p.dim_v;
    const float* parts = which == 0 ? job.dk_part : job.dv_part;
    std::fill(sum, sum + n * cols, 0.0f);
    for (int64_t g = 0; g < job.group; ++g) {
      const float* part = parts + ((b * p.heads_q + kvh * job.group + g) * p.seq + t0) * cols;
      for (int64_t i = 0; i < n * cols; ++i) sum[i] += part[i];
    }
    const int64_t* st = which == 0 ? bp.dk_stride : bp.dv_stride;
    char* dst = static_cast<char*>(which == 0 ? bp.dk : bp.dv) +
                (b * st[0] + kvh * st[1] + t0 * st[2]) * es;
    job.kernel->store_rows(p.dtype, dst, st[2], st[3], sum, cols, n, cols, 1.0f);
  }
}

}  // namespace

const LinearIsaKernel& linear_kernel() {
  const char* forced = forced_isa();
  if (forced[0] != '\0') {
    const LinearIsaKernel* k = by_name(forced);
    if (k != nullptr) return *k;
  }
  static const LinearIsaKernel& best = best_kernel();
  return best;
}

void linear_fwd(const LinearFwdParams& p, int num_threads) {
  if (p.batch <= 0 || p.heads_q <= 0 || p.heads_kv <= 0) return;
  const LinearIsaKernel& k = linear_kernel();
  const int64_t items = p.batch * p.heads_q;
  const double flops = head_flops(p) * static_cast<double>(items);
  const int64_t wanted = thread_count(num_threads, flops, forward_bytes(p), INT64_MAX);
  if (p.causal && items < wanted && p.seq >= 2 * kMinSegment) {
    SplitJob job;
    job.p = &p;
    job.kernel = &k;
    job.n_seg = std::min((2 * wanted + items - 1) / items, p.seq / kMinSegment);
    job.seg_len = ((p.seq + job.n_seg - 1) / job.n_seg + 63) / 64 * 64;  // whole chunks
    job.n_seg = (p.seq + job.seg_len - 1) / job.seg_len;
    job.state_floats = p.feat * p.dim_v + p.feat;
    const int threads = static_cast<int>(std::min<int64_t>(wanted, items * job.n_seg));
    job.stride = worker_stride(k.fwd_scratch_floats(p));
    Buffer scratch = aligned_floats(job.stride * threads);
    Buffer states = aligned_floats(static_cast<size_t>(items * job.n_seg * job.state_floats));
    job.scratch = scratch.get();
    job.states = states.get();
    job.outputs = false;
    parallel_for(items * job.n_seg, threads, &split_item, &job);
    for (int64_t item = 0; item < items; ++item) chain_states(job, item);
    job.outputs = true;
    parallel_for(items * job.n_seg, threads, &split_item, &job);
    return;
  }
  const int threads = thread_count(num_threads, flops, forward_bytes(p), items);
  FwdJob job;
  job.p = &p;
  job.kernel = &k;
  job.stride = worker_stride(k.fwd_scratch_floats(p));
  Buffer scratch = aligned_floats(job.stride * threads);
  job.scratch = scratch.get();
  parallel_for(items, threads, &fwd_item, &job);
}

void linear_bwd(const LinearBwdParams& bp, int num_threads) {
  const LinearFwdParams& p = bp.fwd;
  if (p.batch <= 0 || p.heads_q <= 0 || p.heads_kv <= 0) return;
  const LinearIsaKernel& k = linear_kernel();
  const int64_t items = p.batch * p.heads_q;
  // Backward: about three forwards of products.
  const int threads =
      thread_count(num_threads, 3.0 * head_flops(p) * static_cast<double>(items),
                   2.0 * forward_bytes(p), items);
  BwdJob job;
  job.p = &bp;
  job.kernel = &k;
  job.group = p.heads_q / p.heads_kv;
  job.reduce_rows = 256;
  job.reduce_blocks = (p.seq + job.reduce_rows - 1) / job.reduce_rows;
  const size_t reduce_floats = static_cast<size_t>(job.reduce_rows * std::max(p.feat, p.dim_v));
  job.stride = worker_stride(std::max(k.bwd_scratch_floats(bp), reduce_floats));
  Buffer scratch = aligned_floats(job.stride * threads);
  job.scratch = scratch.get();
  Buffer dk_part, dv_part;
  job.dk_part = job.dv_part = nullptr;
  const bool gqa = job.group > 1 && p.seq > 0;
  if (gqa) {
    dk_part = aligned_floats(static_cast<size_t>(items * p.seq * p.feat));
    dv_part = aligned_floats(static_cast<size_t>(items * p.seq * p.dim_v));
    job.dk_part = dk_part.get();
    job.dv_part = dv_part.get();
  }
  parallel_for(items, threads, &bwd_item, &job);
  if (gqa) {
    parallel_for(p.batch * p.heads_kv * job.reduce_blocks, threads, &reduce_item, &job);
  }
}

}  // namespace cpu
}  // namespace pyattn
