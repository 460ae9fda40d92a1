// Dispatcher of the CPU softmax attention: picks the block kernels for this CPU, cuts the
// forward into blocks of queries and the backward into runs of key blocks, and runs them
// on the thread pool.

#include "attention_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "../common/parallel.h"
#include "../common/scratch.h"

namespace pyattn {
namespace cpu {
namespace {

#if defined(PYATTN_HAVE_AVX2)
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

#if defined(PYATTN_HAVE_AVX512)
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
#endif

std::atomic<const IsaKernel*> g_forced{nullptr};

const IsaKernel& best_kernel() {
  const IsaKernel* kernels[3];
  available_isas(kernels, 3);
  return *kernels[0];
}

const IsaKernel& kernel() {
  const IsaKernel* forced = g_forced.load(std::memory_order_acquire);
  if (forced != nullptr) return *forced;
  static const IsaKernel& best = best_kernel();
  return best;
}

int64_t elem_bytes(int dtype) { return dtype == 0 ? 4 : 2; }

// Sequence b of a packed batch seen as one dense sequence: pointers moved to its first
// rows, its own lengths (so the masks align to them), its dropout counters.
SoftmaxFwdParams sequence_view(const SoftmaxFwdParams& p, int64_t b) {
  SoftmaxFwdParams s = p;
  const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b], es = elem_bytes(p.dtype);
  s.seq_q = p.cu_seqlens_q[b + 1] - q0;
  s.seq_k = p.cu_seqlens_k[b + 1] - k0;
  s.q = static_cast<const char*>(p.q) + q0 * p.q_stride[2] * es;
  s.out = static_cast<char*>(p.out) + q0 * p.out_stride[2] * es;
  if (p.lse != nullptr) s.lse = p.lse + q0 * p.lse_stride[2];
  s.k = static_cast<const char*>(p.k) + k0 * p.k_stride[2] * es;
  s.v = static_cast<const char*>(p.v) + k0 * p.v_stride[2] * es;
  s.dropout_offset = p.dropout_offset + q0 * p.dropout_stride[2] + k0;
  s.cu_seqlens_q = s.cu_seqlens_k = nullptr;
  return s;
}

SoftmaxBwdParams sequence_view(const SoftmaxBwdParams& p, int64_t b) {
  SoftmaxBwdParams s = p;
  s.fwd = sequence_view(p.fwd, b);
  const int64_t q0 = p.fwd.cu_seqlens_q[b], k0 = p.fwd.cu_seqlens_k[b];
  const int64_t es = elem_bytes(p.fwd.dtype);
  s.dout = static_cast<const char*>(p.dout) + q0 * p.dout_stride[2] * es;
  if (p.dlse != nullptr) s.dlse = p.dlse + q0 * p.dlse_stride[2];
  s.dq = static_cast<char*>(p.dq) + q0 * p.dq_stride[2] * es;
  s.dk = static_cast<char*>(p.dk) + k0 * p.dk_stride[2] * es;
  s.dv = static_cast<char*>(p.dv) + k0 * p.dv_stride[2] * es;
  return s;
}

double attention_flops(const SoftmaxFwdParams& p) {
  return 2.0 * static_cast<double>(p.batch * p.heads_q) * p.seq_q * static_cast<double>(p.seq_k) *
         static_cast<double>(p.head_dim + p.head_dim_v);
}

// Bytes a forward reads and writes at least once: q, k, v and out.
double attention_bytes(const SoftmaxFwdParams& p) {
  const double rows_q = static_cast<double>(p.batch * p.heads_q) * static_cast<double>(p.seq_q);
  const double rows_k = static_cast<double>(p.batch * p.heads_kv) * static_cast<double>(p.seq_k);
  return static_cast<double>(elem_bytes(p.dtype)) * (rows_q + rows_k) *
         static_cast<double>(p.head_dim + p.head_dim_v);
}

// ---------------------------------------------------------------- forward

struct Job {
  const SoftmaxFwdParams* p;
  const IsaKernel* kernel;
  float* scratch;
  size_t scratch_stride;  // floats per worker
  bool fused_heads;       // blocks hold several heads of a group (short Sq)
  int64_t group, blocks_per_head, heads_per_block, blocks_per_group;
  int64_t n_blocks;       // query blocks
  int64_t n_splits = 1, split_keys = 0;  // key ranges per block (decoding), keys per range
  float* partials = nullptr;             // n_blocks * n_splits results of split_floats each
  int64_t split_floats = 0;
};

BlockTask block_task(const Job& job, int64_t item) {
  const SoftmaxFwdParams& p = *job.p;
  const int64_t rows = job.kernel->block_rows;
  BlockTask t;
  if (job.fused_heads) {
    const int64_t gb = item % job.blocks_per_group, rest = item / job.blocks_per_group;
    t.batch = rest / p.heads_kv;
    t.kv_head = rest % p.heads_kv;
    t.h_first = t.kv_head * job.group + gb * job.heads_per_block;
    t.n_heads = std::min(job.heads_per_block, job.group - gb * job.heads_per_block);
    t.i_first = 0;
    t.n_i = p.seq_q;
  } else {
    // The query blocks of one head in a row: its keys and values (1 MiB at S = 2048, D = 64)
    // stay in the L2 caches of the threads working on it. Against cycling through the heads
    // block by block, on a 1 MiB-L2 Zen 4: +12% forward on one thread, +4 to 6% on two. Within a
    // head the last query blocks come first: under a causal mask they are the most expensive,
    // and the pool hands items out in order, so the cheap ones fill the gaps at the end.
    const int64_t qb = job.blocks_per_head - 1 - item % job.blocks_per_head;
    const int64_t rest = item / job.blocks_per_head;
    t.batch = rest / p.heads_q;
    t.h_first = rest % p.heads_q;
    t.kv_head = t.h_first / job.group;
    t.n_heads = 1;
    t.i_first = qb * rows;
    t.n_i = std::min(rows, p.seq_q - t.i_first);
  }
  return t;
}

void run_item(void* ctx, int64_t item, int worker) {
  const Job& job = *static_cast<const Job*>(ctx);
  const SoftmaxFwdParams& p = *job.p;
  float* scratch = job.scratch + worker * job.scratch_stride;
  const int64_t block = item % job.n_blocks, split = item / job.n_blocks;
  BlockTask t = block_task(job, block);
  if (job.n_splits > 1) {
    t.key_begin = split * job.split_keys;
    t.key_end = t.key_begin + job.split_keys;
    t.partial = job.partials + (block * job.n_splits + split) * job.split_floats;
  }
  if (p.cu_seqlens_q == nullptr) {
    job.kernel->run_block(p, t, scratch);
    return;
  }
  const SoftmaxFwdParams seq = sequence_view(p, t.batch);
  if (t.i_first >= seq.seq_q) return;
  t.n_i = std::min<int64_t>(job.kernel->block_rows, seq.seq_q - t.i_first);
  job.kernel->run_block(seq, t, scratch);
}

void merge_item(void* ctx, int64_t block, int) {
  const Job& job = *static_cast<const Job*>(ctx);
  const float* partials = job.partials + block * job.n_splits * job.split_floats;
  job.kernel->merge_splits(*job.p, block_task(job, block), partials, job.split_floats,
                           static_cast<int>(job.n_splits));
}

// ---------------------------------------------------------------- backward

struct BwdJob {
  const SoftmaxBwdParams* p;
  const IsaKernel* kernel;
  BwdWorkspace ws;
  int64_t n_tiles, n_pairs, n_chunks, group;
  float* scratch;
  size_t scratch_stride;
  float* dq;              // per worker: n_tiles tiles of [rows][dp]
  size_t dq_stride;       // floats per worker
  uint8_t* touched;       // [worker][pair]: the worker's dq tiles of the pair are live
  int n_workers;
};

// The arguments batch entry b runs with: its sequence's view (kept in *view) when packed.
const SoftmaxBwdParams& params_for(const BwdJob& job, int64_t b, SoftmaxBwdParams* view) {
  if (job.p->fwd.cu_seqlens_q == nullptr) return *job.p;
  *view = sequence_view(*job.p, b);
  return *view;
}

int64_t seq_k_of(const SoftmaxFwdParams& p, int64_t b) {
  return p.cu_seqlens_k != nullptr ? p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b] : p.seq_k;
}

// (batch, head, query tile) of a tile index.
void locate_tile(const BwdJob& job, int64_t tile, int64_t* b, int64_t* h, int64_t* qb) {
  const int64_t* base = job.ws.tile_base;
  const int64_t hq = job.p->fwd.heads_q;
  // The last batch with base[b] * hq <= tile: among equal bases (empty sequences) the last,
  // whose tiles then contain it.
  const int64_t bb = (std::upper_bound(base, base + job.p->fwd.batch + 1, tile / hq) - base) - 1;
  const int64_t per_head = base[bb + 1] - base[bb], rest = tile - base[bb] * hq;
  *b = bb;
  *h = rest / per_head;
  *qb = rest % per_head;
}

void bwd_prepare_item(void* ctx, int64_t tile, int) {
  const BwdJob& job = *static_cast<const BwdJob*>(ctx);
  int64_t b, h, qb;
  locate_tile(job, tile, &b, &h, &qb);
  SoftmaxBwdParams view;
  job.kernel->bwd_prepare(params_for(job, b, &view), job.ws, b, h, qb);
}

void bwd_keys_item(void* ctx, int64_t item, int worker) {
  const BwdJob& job = *static_cast<const BwdJob*>(ctx);
  const SoftmaxFwdParams& p = job.p->fwd;
  // Chunk-major: chunk 0 holds the first keys, which the causal mask shows to most queries.
  const int64_t chunk = item / job.n_pairs, pair = item % job.n_pairs;
  const int64_t b = pair / p.heads_kv, kvh = pair % p.heads_kv;
  const int64_t bn = job.kernel->bwd_keys;
  const int64_t n_kb = (seq_k_of(p, b) + bn - 1) / bn;
  const int64_t kb_begin = n_kb * chunk / job.n_chunks, kb_end = n_kb * (chunk + 1) / job.n_chunks;
  if (kb_begin >= kb_end) return;
  float* dq = job.dq + worker * job.dq_stride;
  uint8_t& touched = job.touched[worker * job.n_pairs + pair];
  if (!touched) {
    // First use of this group's tiles by this worker: zero them.
    const int64_t per_head = job.ws.tile_base[b + 1] - job.ws.tile_base[b];
    const int64_t first = job.ws.tile_base[b] * p.heads_q + kvh * job.group * per_head;
    const size_t tile_floats = static_cast<size_t>(job.kernel->bwd_rows * job.ws.dp);
    std::memset(dq + first * tile_floats, 0, job.group * per_head * tile_floats * sizeof(float));
    touched = 1;
  }
  SoftmaxBwdParams view;
  job.kernel->bwd_key_blocks(params_for(job, b, &view), job.ws, b, kvh, kb_begin, kb_end, dq,
                             job.scratch + worker * job.scratch_stride);
}

void bwd_finish_item(void* ctx, int64_t tile, int) {
  const BwdJob& job = *static_cast<const BwdJob*>(ctx);
  int64_t b, h, qb;
  locate_tile(job, tile, &b, &h, &qb);
  const int64_t pair = b * job.p->fwd.heads_kv + h / job.group;
  std::vector<const float*> parts;
  for (int w = 0; w < job.n_workers; ++w) {
    if (job.touched[w * job.n_pairs + pair]) parts.push_back(job.dq + w * job.dq_stride);
  }
  SoftmaxBwdParams view;
  job.kernel->bwd_finish(params_for(job, b, &view), job.ws, b, h, qb, parts.data(),
                         static_cast<int>(parts.size()));
}

}  // namespace

int available_isas(const IsaKernel* out[], int capacity) {
  int n = 0;
#if defined(PYATTN_HAVE_AVX512)
  if (n < capacity && cpu_has_avx512()) out[n++] = &softmax_kernel_avx512();
#endif
#if defined(PYATTN_HAVE_AVX2)
  if (n < capacity && cpu_has_avx2()) out[n++] = &softmax_kernel_avx2();
#endif
  if (n < capacity) out[n++] = &softmax_kernel_base();
  return n;
}

bool set_isa(const char* name) {
  if (name == nullptr || name[0] == '\0') {
    g_forced.store(nullptr, std::memory_order_release);
    return true;
  }
  const IsaKernel* kernels[3];
  const int n = available_isas(kernels, 3);
  for (int i = 0; i < n; ++i) {
    if (std::strcmp(kernels[i]->name, name) == 0) {
      g_forced.store(kernels[i], std::memory_order_release);
      return true;
    }
  }
  return false;
}

const char* current_isa() { return kernel().name; }

const char* forced_isa() {
  const IsaKernel* forced = g_forced.load(std::memory_order_acquire);
  return forced != nullptr ? forced->name : "";
}

void softmax_fwd(const SoftmaxFwdParams& p, int num_threads) {
  if (p.batch <= 0 || p.heads_q <= 0 || p.seq_q <= 0 || p.heads_kv <= 0) return;
  const IsaKernel& k = kernel();
  const int64_t rows = k.block_rows;

  Job job;
  job.p = &p;
  job.kernel = &k;
  job.group = p.heads_q / p.heads_kv;
  job.fused_heads = job.group > 1 && p.seq_q * 2 <= rows && p.cu_seqlens_q == nullptr;
  if (job.fused_heads) {
    job.heads_per_block = std::min(job.group, rows / p.seq_q);
    job.blocks_per_group = (job.group + job.heads_per_block - 1) / job.heads_per_block;
    job.n_blocks = p.batch * p.heads_kv * job.blocks_per_group;
  } else {
    job.blocks_per_head = (p.seq_q + rows - 1) / rows;
    job.n_blocks = p.batch * p.heads_q * job.blocks_per_head;
  }
  const double flops = attention_flops(p);
  int threads = thread_count(num_threads, flops, attention_bytes(p), INT64_MAX);
  // Fewer query blocks than threads (decoding): split the keys as flash-decoding does, at
  // least 256 keys per range, about two ranges per thread.
  constexpr int64_t kMinSplitKeys = 256;
  if (job.n_blocks < threads && p.cu_seqlens_q == nullptr && p.seq_k >= 2 * kMinSplitKeys) {
    const int64_t want =
        std::min<int64_t>((2 * threads + job.n_blocks - 1) / job.n_blocks, p.seq_k / kMinSplitKeys);
    job.split_keys = ((p.seq_k + want - 1) / want + 63) / 64 * 64;
    job.n_splits = (p.seq_k + job.split_keys - 1) / job.split_keys;
  }
  const int64_t n_items = job.n_blocks * job.n_splits;
  threads = static_cast<int>(std::min<int64_t>(threads, n_items));
  job.scratch_stride = worker_stride(k.scratch_floats(p));
  Buffer scratch = aligned_floats(job.scratch_stride * threads);
  job.scratch = scratch.get();
  Buffer partials;
  if (job.n_splits > 1) {
    job.split_floats = rows * (p.head_dim_v + 1);
    partials = aligned_floats(static_cast<size_t>(n_items * job.split_floats));
    job.partials = partials.get();
  }
  parallel_for(n_items, threads, &run_item, &job);
  if (job.n_splits > 1) parallel_for(job.n_blocks, threads, &merge_item, &job);
}

void softmax_bwd(const SoftmaxBwdParams& bp, int num_threads) {
  const SoftmaxFwdParams& p = bp.fwd;
  if (p.batch <= 0 || p.heads_q <= 0 || p.heads_kv <= 0) return;
  const IsaKernel& k = kernel();
  const int64_t bm = k.bwd_rows, bn = k.bwd_keys;

  std::vector<int64_t> tile_base(p.batch + 1, 0);
  int64_t max_kb = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t sq =
        p.cu_seqlens_q != nullptr ? p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b] : p.seq_q;
    tile_base[b + 1] = tile_base[b] + (sq + bm - 1) / bm;
    max_kb = std::max(max_kb, (seq_k_of(p, b) + bn - 1) / bn);
  }

  BwdJob job;
  job.p = &bp;
  job.kernel = &k;
  job.group = p.heads_q / p.heads_kv;
  job.n_tiles = tile_base[p.batch] * p.heads_q;
  job.n_pairs = p.batch * p.heads_kv;
  job.ws.tile_base = tile_base.data();
  job.ws.dp = (p.head_dim + 15) / 16 * 16;
  job.ws.dvp = (p.head_dim_v + 15) / 16 * 16;
  // Backward: 5 products of the forward's size instead of 2.
  const int threads = thread_count(num_threads, 2.5 * attention_flops(p), 2.0 * attention_bytes(p),
                                   std::max<int64_t>(job.n_pairs * max_kb, job.n_tiles));
  job.n_workers = threads;
  // Several chunks of key blocks per (batch, kv head) when there are too few pairs to keep
  // every thread busy; one otherwise, so that a pair's dq tiles live in one worker only.
  job.n_chunks = 1;
  if (threads > 1) {
    const int64_t want = (4 * threads + job.n_pairs - 1) / job.n_pairs;
    job.n_chunks = std::max<int64_t>(1, std::min<int64_t>(max_kb, want));
  }

  const size_t tiles = static_cast<size_t>(job.n_tiles);
  Buffer qn = aligned_floats(tiles * bm * job.ws.dp), don = aligned_floats(tiles * bm * job.ws.dvp);
  Buffer lse2 = aligned_floats(tiles * bm), delta = aligned_floats(tiles * bm);
  job.ws.qn = qn.get();
  job.ws.don = don.get();
  job.ws.lse2 = lse2.get();
  job.ws.delta = delta.get();
  // Pages of a worker's dq tiles are only touched (zeroed) for the pairs it works on.
  job.dq_stride = worker_stride(tiles * bm * job.ws.dp);
  Buffer dq = aligned_floats(job.dq_stride * threads);
  job.dq = dq.get();
  std::vector<uint8_t> touched(static_cast<size_t>(threads * job.n_pairs), 0);
  job.touched = touched.data();
  job.scratch_stride = worker_stride(k.bwd_scratch_floats(p, job.ws));
  Buffer scratch = aligned_floats(job.scratch_stride * threads);
  job.scratch = scratch.get();

  parallel_for(job.n_tiles, threads, &bwd_prepare_item, &job);
  parallel_for(job.n_pairs * job.n_chunks, threads, &bwd_keys_item, &job);
  parallel_for(job.n_tiles, threads, &bwd_finish_item, &job);
}

}  // namespace cpu
}  // namespace pyattn
