// The execution engine of the CUDA emulation (see cuda_runtime.h): runs a grid's CTAs on a
// few OS threads, each CTA's threads as ucontext fibers scheduled cooperatively, with
// __syncthreads barriers and warp rendezvous; records the first error of a launch.
//
// Environment, read at every launch: PYATTN_EMU_THREADS (OS threads, default: hardware
// threads) and PYATTN_EMU_SCHEDULE, the order in which a CTA's ready fibers run:
//   round (default)  passes over threads 0..n-1, each running until it blocks: warps advance
//                    about one collective per pass, near lockstep;
//   greedy           always resumes the lowest ready thread: warp 0 runs ahead to the next
//                    barrier before warp 1 starts, so a missing barrier lets it overwrite shared
//                    data the others still need;
//   round-reverse, greedy-reverse: the same from the highest thread down.

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cuda_runtime.h"

namespace pyattn_emu {

thread_local Thread* t_current = nullptr;
thread_local dim3 t_block_idx, t_grid_dim, t_block_dim;
thread_local unsigned char* t_dynamic_smem = nullptr;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSmemGuard = 256;  // canary bytes after the dynamic shared memory
constexpr unsigned char kCanary = 0xA5;
constexpr size_t kMaxSmemDefault = 48 * 1024, kMaxSmemOptin = 227 * 1024;

std::mutex g_mutex;
std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize
std::atomic<bool> g_failed{false};
std::string g_error;  // the first failure of the current launch
cudaError_t g_last_error = cudaSuccess;

enum class Wait { kNone, kBarrier, kWarp };

struct AsyncCopy {
  unsigned char* dst;
  const void* src;
  int bytes;
};

struct Fiber {
  Thread thread;
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  std::vector<AsyncCopy> copies;  // cp.async issued, not yet retired
  std::vector<size_t> groups;     // end (in copies) of every committed group not yet retired
  bool done = false;
  Wait wait = Wait::kNone;
};

struct Warp {
  Slots in, out;
  unsigned live = 0;     // lanes not yet exited
  unsigned arrived = 0;  // lanes waiting in the current collective
  int kind = 0;
};

// One OS thread's CTA executor; its fibers and stacks are reused across CTAs.
struct Cta {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned char> smem;
  size_t smem_bytes = 0;
  ucontext_t scheduler;
  int live = 0, at_barrier = 0;
  Body body = nullptr;
  void* closure = nullptr;
};

thread_local Cta* t_cta = nullptr;

Fiber& current_fiber() { return t_cta->fibers[t_current->index]; }

void switch_to_scheduler() {
  Fiber& f = current_fiber();
  swapcontext(&f.ctx, &t_cta->scheduler);
}

void block(Wait why) {
  current_fiber().wait = why;
  switch_to_scheduler();
}

void release_barrier_if_complete() {
  Cta& cta = *t_cta;
  if (cta.at_barrier == 0 || cta.at_barrier < cta.live) return;
  cta.at_barrier = 0;
  for (Fiber& f : cta.fibers) {
    if (f.wait == Wait::kBarrier) f.wait = Wait::kNone;
  }
}

void fiber_main() {
  t_cta->body(t_cta->closure);
  Fiber& f = current_fiber();
  if (!f.copies.empty()) fail("a thread exited with cp.async copies it never waited for");
  f.done = true;
  Cta& cta = *t_cta;
  --cta.live;
  cta.warps[f.thread.index / 32].live &= ~(1u << (f.thread.index % 32));
  release_barrier_if_complete();  // exited threads no longer hold a barrier back
  // returning resumes uc_link: the scheduler
}

size_t thread_count(dim3 b) { return static_cast<size_t>(b.x) * b.y * b.z; }

struct Schedule {
  bool greedy = false, reverse = false;
};

Schedule schedule_from_env() {
  const char* env = std::getenv("PYATTN_EMU_SCHEDULE");
  const std::string s = env ? env : "round";
  Schedule sch;
  sch.greedy = s.rfind("greedy", 0) == 0;
  sch.reverse = s.find("reverse") != std::string::npos;
  return sch;
}

void run_cta(Cta& cta, dim3 block, Schedule schedule) {
  const int n = static_cast<int>(thread_count(block));
  cta.live = n;
  cta.at_barrier = 0;
  for (Warp& w : cta.warps) w = Warp();
  for (int i = 0; i < n; ++i) {
    Fiber& f = cta.fibers[i];
    f.thread.idx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    f.thread.index = i;
    f.done = false;
    f.wait = Wait::kNone;
    f.copies.clear();
    f.groups.clear();
    cta.warps[i / 32].live |= 1u << (i % 32);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &cta.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  // Uninitialised shared memory reads as NaN (0xFF bytes), the guard after it as a canary.
  std::memset(cta.smem.data(), 0xFF, cta.smem_bytes);
  std::memset(cta.smem.data() + cta.smem_bytes, kCanary, kSmemGuard);
  while (cta.live > 0 && !g_failed.load(std::memory_order_relaxed)) {
    bool progressed = false;
    for (int k = 0; k < n; ++k) {
      Fiber& f = cta.fibers[schedule.reverse ? n - 1 - k : k];
      if (f.done || f.wait != Wait::kNone) continue;
      t_current = &f.thread;
      swapcontext(&cta.scheduler, &f.ctx);
      progressed = true;
      if (schedule.greedy || g_failed.load(std::memory_order_relaxed)) break;  // greedy: rescan from the start
    }
    if (!progressed) {
      fail(cta.at_barrier > 0 ? "deadlock: threads wait at __syncthreads while others wait in a warp collective"
                              : "deadlock: a warp collective that not every live lane reaches");
    }
  }
  for (size_t i = 0; i < kSmemGuard; ++i) {
    if (cta.smem[cta.smem_bytes + i] != kCanary) {
      fail("write past the end of dynamic shared memory");
      break;
    }
  }
  t_current = nullptr;
}

void run_worker(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, Body body, void* closure,
                std::atomic<int64_t>* next, Schedule schedule) {
  Cta cta;
  const size_t n = thread_count(block);
  cta.fibers = std::vector<Fiber>(n);
  for (Fiber& f : cta.fibers) f.stack.reset(new char[kStackBytes]);
  cta.warps.resize((n + 31) / 32);
  cta.smem.resize(smem_bytes + kSmemGuard);
  cta.smem_bytes = smem_bytes;
  cta.body = body;
  cta.closure = closure;
  t_cta = &cta;
  t_dynamic_smem = cta.smem.data();
  t_grid_dim = grid;
  t_block_dim = block;
  const int64_t total = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  for (int64_t i; (i = next->fetch_add(1)) < total && !g_failed.load();) {
    t_block_idx = dim3(static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
                       static_cast<unsigned>(i / (static_cast<int64_t>(grid.x) * grid.y)));
    run_cta(cta, block, schedule);
  }
  (void)kernel;
  t_cta = nullptr;
  t_dynamic_smem = nullptr;
}

cudaError_t check_config(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes) {
  const size_t threads = thread_count(block);
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535 || grid.x > 2147483647u) {
    return cudaErrorInvalidConfiguration;
  }
  if (smem_bytes > kMaxSmemDefault) {  // needs the opt-in attribute, as on the device
    std::lock_guard<std::mutex> lock(g_mutex);
    const auto it = g_max_dynamic_smem.find(kernel);
    if (it == g_max_dynamic_smem.end() || static_cast<size_t>(it->second) < smem_bytes) {
      return cudaErrorInvalidValue;
    }
  }
  return cudaSuccess;
}

}  // namespace

void fail(const char* what) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_failed.exchange(true)) g_error = what;
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > kMaxSmemOptin) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(g_mutex);
  g_max_dynamic_smem[kernel] = bytes;
  return cudaSuccess;
}

const char* error_string(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: {
      thread_local std::string message;
      std::lock_guard<std::mutex> lock(g_mutex);
      message = "emulated kernel failure: " + g_error;
      return message.c_str();
    }
  }
  return "unknown error";
}

cudaError_t take_last_error() {
  const cudaError_t err = g_last_error;
  g_last_error = cudaSuccess;
  return err;
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, Body body, void* closure) {
  const cudaError_t config = check_config(kernel, grid, block, smem_bytes);
  if (config != cudaSuccess) {
    g_last_error = config;
    return;
  }
  if (g_last_error != cudaSuccess) return;  // a sticky failure: later launches do not run
  g_failed = false;
  g_error.clear();
  const char* env = std::getenv("PYATTN_EMU_THREADS");
  int64_t workers = env ? std::atoi(env) : static_cast<int64_t>(std::thread::hardware_concurrency());
  const int64_t ctas = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  workers = std::max<int64_t>(1, std::min(workers, ctas));
  const Schedule schedule = schedule_from_env();
  std::atomic<int64_t> next{0};
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < workers; ++w) {
    pool.emplace_back(run_worker, kernel, grid, block, smem_bytes, body, closure, &next, schedule);
  }
  run_worker(kernel, grid, block, smem_bytes, body, closure, &next, schedule);
  for (std::thread& t : pool) t.join();
  if (g_failed) g_last_error = cudaErrorLaunchFailure;
}

void syncthreads() {
  Cta& cta = *t_cta;
  ++cta.at_barrier;
  if (cta.at_barrier >= cta.live) {
    release_barrier_if_complete();
    return;
  }
  block(Wait::kBarrier);
}

void warp_collective(int kind, unsigned mask, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                     Compute compute, void* closure) {
  Cta& cta = *t_cta;
  const unsigned idx = static_cast<unsigned>(t_current->index);
  const unsigned lane = idx % 32;
  Warp& w = cta.warps[idx / 32];
  if (!(mask >> lane & 1u)) fail("warp collective: the calling lane is not in its mask");
  if ((mask & ~w.live) != 0) fail("warp collective: its mask names lanes that have exited (undefined on the device)");
  if (w.arrived == 0) {
    w.kind = kind;
  } else if (w.kind != kind) {
    fail("warp divergence: lanes of one warp meet at different collective operations");
  }
  if (in_bytes > 0) std::memcpy(w.in[lane], in, in_bytes);
  w.arrived |= 1u << lane;
  const unsigned expected = mask & w.live;
  if ((w.arrived & expected) == expected) {
    compute(closure, w.in, w.out, w.arrived);
    for (unsigned l = 0; l < 32; ++l) {
      if ((w.arrived >> l & 1u) && l != lane) cta.fibers[idx - lane + l].wait = Wait::kNone;
    }
    w.arrived = 0;
  } else {
    block(Wait::kWarp);
  }
  if (out_bytes > 0) std::memcpy(out, w.out[lane], out_bytes);
}

void cp_async_queue(unsigned char* dst, const void* src, int src_bytes) {
  current_fiber().copies.push_back(AsyncCopy{dst, src, src_bytes});
}

void cp_async_commit() {
  Fiber& f = current_fiber();
  f.groups.push_back(f.copies.size());
}

void cp_async_wait(int n) {
  Fiber& f = current_fiber();
  if (static_cast<int>(f.groups.size()) <= n) return;
  const size_t retire_groups = f.groups.size() - static_cast<size_t>(n), end = f.groups[retire_groups - 1];
  for (size_t i = 0; i < end; ++i) {
    const AsyncCopy& c = f.copies[i];
    std::memset(c.dst, 0, 16);
    if (c.bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
  }
  f.copies.erase(f.copies.begin(), f.copies.begin() + static_cast<std::ptrdiff_t>(end));
  f.groups.erase(f.groups.begin(), f.groups.begin() + static_cast<std::ptrdiff_t>(retire_groups));
  for (size_t& g : f.groups) g -= end;
}

uint32_t shared_offset(const void* p) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < t_dynamic_smem || c > t_dynamic_smem + t_cta->smem_bytes) {
    fail("shared address of a pointer outside the dynamic shared memory");
    return 0;
  }
  return static_cast<uint32_t>(c - t_dynamic_smem);
}

unsigned char* shared_pointer(uint32_t offset, size_t bytes, const char* what) {
  static thread_local char message[160];
  if (static_cast<size_t>(offset) + bytes > t_cta->smem_bytes) {
    std::snprintf(message, sizeof(message), "%s: shared access [%u, %zu) past the %zu bytes of the CTA", what,
                  offset, offset + bytes, t_cta->smem_bytes);
    fail(message);
    return nullptr;
  }
  return t_dynamic_smem + offset;
}

}  // namespace pyattn_emu
