// Host stand-in for cuda_runtime.h: just enough CUDA for g++ to compile pyattn's kernel
// sources unchanged (with -DPYATTN_CUDA_EMULATION) and run them on the CPU, so tests can check
// the kernels' logic against the float64 reference on machines without a GPU.
//
// Execution model (emu_runtime.cpp): a launch runs every CTA; CTAs are spread over a few OS
// threads, and one OS thread runs all threads of its CTA as cooperative fibers, switching only
// at __syncthreads and at warp-collective operations (shuffles, __syncwarp, ldmatrix, mma).
// A warp collective is a rendezvous: each lane deposits its operands, the last lane to arrive
// computes the whole warp's result, and every lane picks up its part. Scheduling is
// deterministic; a barrier or collective that can never complete is reported as an error.
//
// Per-fiber state (threadIdx) is reached through the running fiber, per-CTA state (blockIdx,
// shared memory) through thread-locals of the OS thread, which runs one CTA at a time:
// `__shared__` variables are therefore `static thread_local`.
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------------------- keywords

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static thread_local
#define __restrict__ __restrict

// ------------------------------------------------------------------------------- vector types

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };

inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ------------------------------------------------------------------------------- runtime API

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace pyattn_emu {

struct Thread {  // one CUDA thread: a fiber of its CTA's OS thread
  dim3 idx;
  int index;  // linear index in the CTA (lane = index % 32, as on the device)
};

extern thread_local Thread* t_current;  // the running fiber
extern thread_local dim3 t_block_idx, t_grid_dim, t_block_dim;
extern thread_local unsigned char* t_dynamic_smem;

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);
const char* error_string(cudaError_t err);
cudaError_t take_last_error();

// Runs body() as every thread of every CTA of the grid (returns when all are done).
using Body = void (*)(void* closure);
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, Body body, void* closure);

void fail(const char* what);  // records the launch's first error and stops its CTAs
void syncthreads();

// Warp rendezvous: every live lane (of `mask`) deposits `in` (kind tags the operation, to catch
// lanes meeting at different collectives); the last one runs compute(closure, ins, outs) over
// the 32 slots, then each lane copies its `out` slot back.
constexpr int kSlotBytes = 64;
using Slots = unsigned char[32][kSlotBytes];
using Compute = void (*)(void* closure, const Slots& ins, Slots& outs, unsigned lanes);
void warp_collective(int kind, unsigned mask, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                     Compute compute, void* closure);

inline unsigned lane_id() { return static_cast<unsigned>(t_current->index) % 32u; }

// Emulated CTA shared-memory window: the "shared address" of a generic pointer is its offset
// into the dynamic shared memory of the running CTA.
uint32_t shared_offset(const void* p);
unsigned char* shared_pointer(uint32_t offset, size_t bytes, const char* what);

// cp.async of the running thread: queue a copy, close a group, retire all but the newest n groups.
void cp_async_queue(unsigned char* dst, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int n);

enum Kind { kShfl = 1, kSyncWarp, kLdmatrix, kMma };

template <typename V>
V shfl(unsigned mask, V v, int src_lane) {
  static_assert(sizeof(V) <= 8, "shuffle of at most 64 bits");
  struct In {
    unsigned char value[8];
    int src;
  } in{};
  std::memcpy(in.value, &v, sizeof(V));
  in.src = src_lane;
  unsigned char out[8];
  warp_collective(
      kShfl, mask, &in, sizeof(in), out, 8,
      [](void*, const Slots& ins, Slots& outs, unsigned lanes) {
        for (int l = 0; l < 32; ++l) {
          if (!(lanes >> l & 1u)) continue;
          In me;
          std::memcpy(&me, ins[l], sizeof(In));
          std::memcpy(outs[l], ins[me.src], 8);  // an exited source lane: unspecified
        }
      },
      nullptr);
  V r;
  std::memcpy(&r, out, sizeof(V));
  return r;
}

// Kernel arguments as the kernel's parameter types (a copy, as on the device), run per thread.
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... args) const {
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    struct Closure {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...>* params;
    } c{kernel, &params};
    run_grid(
        reinterpret_cast<const void*>(kernel), grid, block, smem,
        [](void* p) {
          auto* c = static_cast<Closure*>(p);
          std::apply(c->kernel, *c->params);
        },
        &c);
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  return Launch<P...>{kernel, grid, block, smem};
}

}  // namespace pyattn_emu

#define threadIdx (::pyattn_emu::t_current->idx)
#define blockIdx (::pyattn_emu::t_block_idx)
#define gridDim (::pyattn_emu::t_grid_dim)
#define blockDim (::pyattn_emu::t_block_dim)

inline const char* cudaGetErrorString(cudaError_t err) { return pyattn_emu::error_string(err); }
inline cudaError_t cudaGetLastError() { return pyattn_emu::take_last_error(); }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return pyattn_emu::set_max_dynamic_smem(kernel, value);
}
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// ------------------------------------------------------------------------------- device functions

inline void __syncthreads() { pyattn_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  pyattn_emu::warp_collective(pyattn_emu::kSyncWarp, mask, nullptr, 0, nullptr, 0,
                              [](void*, const pyattn_emu::Slots&, pyattn_emu::Slots&, unsigned) {}, nullptr);
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() {}

// Source lanes as the CUDA programming guide defines them for a segment of `width` lanes.
template <typename V>
V __shfl_sync(unsigned mask, V v, int src, int width = 32) {
  const int lane = static_cast<int>(pyattn_emu::lane_id()), base = lane & ~(width - 1);
  return pyattn_emu::shfl(mask, v, base + (src & (width - 1)));
}
template <typename V>
V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
  const int lane = static_cast<int>(pyattn_emu::lane_id()), s = lane ^ lane_mask;
  return pyattn_emu::shfl(mask, v, s >= (lane & ~(width - 1)) + width ? lane : s);
}
template <typename V>
V __shfl_up_sync(unsigned mask, V v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(pyattn_emu::lane_id()), s = lane - static_cast<int>(delta);
  return pyattn_emu::shfl(mask, v, s < (lane & ~(width - 1)) ? lane : s);
}
template <typename V>
V __shfl_down_sync(unsigned mask, V v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(pyattn_emu::lane_id()), s = lane + static_cast<int>(delta);
  return pyattn_emu::shfl(mask, v, s >= (lane & ~(width - 1)) + width ? lane : s);
}

// CTAs run concurrently on several OS threads: global atomics are real atomics.
inline float atomicAdd(float* p, float v) {
  uint32_t* u = reinterpret_cast<uint32_t*>(p);
  uint32_t old = __atomic_load_n(u, __ATOMIC_RELAXED), next;
  float f;
  do {
    std::memcpy(&f, &old, 4);
    f += v;
    std::memcpy(&next, &f, 4);
  } while (!__atomic_compare_exchange_n(u, &old, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  std::memcpy(&f, &old, 4);
  return f;
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline int __float_as_int(float f) { return static_cast<int>(__float_as_uint(f)); }
inline float __int_as_float(int i) { return __uint_as_float(static_cast<unsigned>(i)); }

// Fast-math intrinsics: the accurate functions (their device error bounds are a few ulp).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __exp2f(float x) { return exp2f(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

// Generic -> shared address (offset into the running CTA's dynamic shared memory).
inline size_t __cvta_generic_to_shared(const void* p) { return pyattn_emu::shared_offset(p); }
