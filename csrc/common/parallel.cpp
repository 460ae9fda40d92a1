// parallel_for: on the OpenMP runtime torch loaded, else on a pool of sleeping threads.
// See parallel.h for why.

#include "parallel.h"

#include <pthread.h>

#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#endif

#include <atomic>
#include <cstring>
#include <condition_variable>
#include <mutex>
#include <new>
#include <thread>

namespace pyattn {
namespace {

// Workers block on a condition variable between jobs (no spinning); the caller of run()
// takes items too, and sleeps while it waits for the last worker.
class ThreadPool {
 public:
  void run(int64_t n_items, int n_threads, ParallelBody fn, void* ctx) {
    std::lock_guard<std::mutex> call_guard(call_mutex_);
    const int n_workers = n_threads - 1;  // the caller works too
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (n_started_ < n_workers) {
        const int index = ++n_started_;
        std::thread([this, index] { worker_loop(index); }).detach();  // lives until exit
      }
      fn_ = fn;
      ctx_ = ctx;
      n_items_ = n_items;
      next_item_.store(0, std::memory_order_relaxed);
      active_workers_ = n_workers;
      n_participants_ = n_threads;
      ++generation_;
    }
    if (n_workers > 0) wake_.notify_all();
    drain(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return active_workers_ == 0; });
  }

 private:
  void drain(int worker) {
    for (;;) {
      const int64_t item = next_item_.fetch_add(1, std::memory_order_relaxed);
      if (item >= n_items_) return;
      fn_(ctx_, item, worker);
    }
  }

  void worker_loop(int index) {
    uint64_t seen = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      seen = generation_ - 1;  // a job may already be waiting for this new worker
    }
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= n_participants_) continue;
      }
      drain(index);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--active_workers_ == 0) done_.notify_one();
    }
  }

  std::mutex call_mutex_;  // one job at a time
  std::mutex mutex_;       // guards everything below
  std::condition_variable wake_, done_;
  int n_started_ = 0;  // workers 1..n_started_ exist
  uint64_t generation_ = 1;
  int n_participants_ = 0;
  int active_workers_ = 0;
  ParallelBody fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_items_ = 0;
  std::atomic<int64_t> next_item_{0};
};

// Never destroyed: detached workers may still be asleep in it at exit. After fork() only
// the forking thread exists in the child, so the child starts a fresh pool and leaks the
// old one (whose mutexes may have been held by threads that no longer exist).
ThreadPool* g_pool = nullptr;
std::mutex g_pool_mutex;

ThreadPool& pool() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_pool == nullptr) g_pool = new ThreadPool();
  return *g_pool;
}

// libgomp is not fork-safe: a parallel region in a forked child of a process that used
// OpenMP waits forever for the parent's threads. Children therefore use our own pool.
std::atomic<bool> g_in_forked_child{false};

void on_fork_child() {
  new (&g_pool_mutex) std::mutex();  // may have been held by a thread that is gone
  g_pool = nullptr;
  g_in_forked_child.store(true, std::memory_order_relaxed);
}

// Registered when the module is loaded, so that a fork before our first call counts too.
[[maybe_unused]] const int g_atfork_registered = pthread_atfork(nullptr, nullptr, on_fork_child);

// ---------------------------------------------------------------- borrowed OpenMP
// GOMP_parallel(fn, data, num_threads, flags) runs fn(data) on a team of num_threads
// (the caller is thread 0) and returns when all are done: libgomp's ABI, also exported
// by LLVM's libomp and Intel's libiomp5 for GCC-compiled code.
struct OpenMP {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;
  int (*thread_num)() = nullptr;
};

#if defined(__linux__)
struct OpenMPSearch {
  OpenMP api;
  bool found = false, from_torch = false;
};

// dl_iterate_phdr callback: remembers a loaded OpenMP runtime, preferring torch's own
// copy (under .../torch/...) should the process hold more than one.
int find_openmp(struct dl_phdr_info* info, size_t, void* data) {
  OpenMPSearch& search = *static_cast<OpenMPSearch*>(data);
  const char* path = info->dlpi_name;
  const char* base = path != nullptr ? std::strrchr(path, '/') : nullptr;
  base = base != nullptr ? base + 1 : path;
  if (base == nullptr ||
      (std::strncmp(base, "libgomp", 7) != 0 && std::strncmp(base, "libiomp5", 8) != 0 &&
       std::strncmp(base, "libomp", 6) != 0)) {
    return 0;
  }
  const bool from_torch = std::strstr(path, "/torch/") != nullptr;
  if (search.found && (search.from_torch || !from_torch)) return 0;
  void* handle = dlopen(path, RTLD_LAZY | RTLD_NOLOAD);  // already loaded: never loads one
  if (handle == nullptr) return 0;
  OpenMP api;
  api.parallel = reinterpret_cast<decltype(api.parallel)>(dlsym(handle, "GOMP_parallel"));
  api.thread_num = reinterpret_cast<decltype(api.thread_num)>(dlsym(handle, "omp_get_thread_num"));
  if (api.parallel == nullptr || api.thread_num == nullptr) {
    dlclose(handle);
    return 0;
  }
  // The handle stays open for the process's lifetime (one per runtime, at most a few).
  search.api = api;
  search.found = true;
  search.from_torch = from_torch;
  return 0;
}

int count_loads(struct dl_phdr_info* info, size_t, void* out) {
  *static_cast<unsigned long long*>(out) = info->dlpi_adds;
  return 1;
}
#endif

// The OpenMP runtime loaded in this process, if any; looked for again whenever a shared
// library has been loaded since the last look (torch may be imported after us).
const OpenMP* loaded_openmp() {
#if defined(__linux__)
  static std::mutex mutex;
  static OpenMP found;
  static bool have = false;
  static unsigned long long loads_seen = ~0ull;
  std::lock_guard<std::mutex> lock(mutex);
  if (!have) {
    unsigned long long loads = 0;
    dl_iterate_phdr(&count_loads, &loads);
    if (loads != loads_seen) {
      loads_seen = loads;
      OpenMPSearch search;
      dl_iterate_phdr(&find_openmp, &search);
      found = search.api;
      have = search.found;
    }
  }
  return have ? &found : nullptr;
#else
  return nullptr;
#endif
}

std::atomic<bool> g_own_pool_only{false};

struct OpenMPJob {
  const OpenMP* api;
  ParallelBody fn;
  void* ctx;
  int64_t n_items;
  std::atomic<int64_t> next{0};
};

void openmp_body(void* data) {
  OpenMPJob& job = *static_cast<OpenMPJob*>(data);
  const int worker = job.api->thread_num();
  for (;;) {
    const int64_t item = job.next.fetch_add(1, std::memory_order_relaxed);
    if (item >= job.n_items) return;
    job.fn(job.ctx, item, worker);
  }
}

}  // namespace

void parallel_for(int64_t n_items, int n_threads, ParallelBody fn, void* ctx) {
  if (n_items <= 0) return;
  if (n_threads > n_items) n_threads = static_cast<int>(n_items);
  if (n_threads <= 1) {
    for (int64_t item = 0; item < n_items; ++item) fn(ctx, item, 0);
    return;
  }
  const bool own = g_own_pool_only.load(std::memory_order_relaxed) ||
                   g_in_forked_child.load(std::memory_order_relaxed);
  const OpenMP* api = own ? nullptr : loaded_openmp();
  if (api != nullptr) {
    // The team may come out smaller than asked (nested region): items still all run,
    // and thread numbers stay below n_threads.
    OpenMPJob job;
    job.api = api;
    job.fn = fn;
    job.ctx = ctx;
    job.n_items = n_items;
    api->parallel(&openmp_body, &job, static_cast<unsigned>(n_threads), 0);
    return;
  }
  pool().run(n_items, n_threads, fn, ctx);
}

const char* parallel_backend() {
  if (g_own_pool_only.load(std::memory_order_relaxed) ||
      g_in_forked_child.load(std::memory_order_relaxed) || loaded_openmp() == nullptr) {
    return "pool";
  }
  return "openmp";
}

void use_own_pool_only(bool own) { g_own_pool_only.store(own, std::memory_order_relaxed); }

}  // namespace pyattn
