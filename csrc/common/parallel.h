// Parallel loop of the CPU kernels, sharing cores politely with torch.
//
// torch runs its CPU ops on its own OpenMP runtime, whose idle threads spin for a few
// milliseconds after each parallel region. Any second set of threads (another OpenMP
// runtime, or a plain pool) started in that window competes with those spinning threads
// for the cores: measured here, our kernel right after torch SDPA ran 1.4x slower.
// So parallel_for runs on the OpenMP runtime already loaded in the process (torch's
// libgomp, or an LLVM / Intel one, through the GOMP_parallel entry point they all
// export) when there is one: the same threads torch uses, no oversubscription. Without
// one it falls back to a small pool of our own whose idle workers sleep on a condition
// variable. Nothing is linked against OpenMP, so the wheel needs no OpenMP library.
#pragma once

#include <cstdint>

namespace pyattn {

// Calls fn(ctx, item, worker) for every item in [0, n_items), spread over up to
// n_threads threads (the calling thread is worker 0; worker < n_threads). Items are
// handed out dynamically in increasing order, so put the most expensive ones first.
// fn must not throw.
using ParallelBody = void (*)(void* ctx, int64_t item, int worker);
void parallel_for(int64_t n_items, int n_threads, ParallelBody fn, void* ctx);

// "openmp" (the runtime loaded in the process) or "pool" (our own threads).
const char* parallel_backend();

// Never borrow OpenMP, always use our pool (for tests of the pool).
void use_own_pool_only(bool own);

}  // namespace pyattn
