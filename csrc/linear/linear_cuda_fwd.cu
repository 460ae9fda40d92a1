// CUDA chunked causal linear-recurrent attention, forward (shared/API.md section 2).
//
// The kernel (chunk_fwd_kernel, linear_cuda_common.cuh) runs one CTA per (batch * query
// head, 64-column value tile), sequential over chunks of kFwdChunk = 64 tokens, with the
// F x 64 float32 state in shared memory; in-chunk products are register-tiled SIMT float32
// FMAs (no tensor cores). GQA reads kv head h / (Hq / Hkv) directly. Unless that grid is
// several waves already, the same kernel runs twice instead (plan_linear_chunk_fwd asks for a
// workspace): a states-only sweep saving the state entering every chunk, then all chunks'
// outputs at once.

#include "linear_cuda_common.cuh"
#include "linear_cuda_kernels.h"

namespace pyattn {
namespace cuda {

template <typename T, int kBucket>
cudaError_t linear_chunk_fwd(const LinearFwdParams& p, const LaunchPlan& plan, float* workspace,
                             cudaStream_t stream) {
  if (plan.grid[0] == 0 || plan.grid[1] == 0) return cudaSuccess;
  auto kernel = lin::chunk_fwd_kernel<T, kBucket, kFwdChunk>;
  const int64_t smem = fwd_smem(kBucket, kFwdChunk).total * 4;
  cudaError_t err = lin::set_smem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  const unsigned nvt = static_cast<unsigned>(plan.grid[1]);
  if (plan.workspace_floats == 0) {  // one pass
    const dim3 grid(static_cast<unsigned>(plan.grid[0]), nvt, 1);
    PYATTN_LAUNCH(kernel, grid, kLinThreads, smem, stream)(p, lin::SweepArgs{});
    return cudaGetLastError();
  }
  // Two passes: the state entering every chunk (and the final state), then every chunk's output.
  const int64_t bh = p.batch * p.heads_q, nc = cdiv64(p.seq, kFwdChunk);
  LinearFwdParams states_only = p;
  states_only.out = nullptr;
  lin::SweepArgs first;
  first.states = workspace;
  first.zstates = workspace + bh * nc * p.feat * p.dim_v;
  const dim3 sweep_grid(static_cast<unsigned>(bh), nvt, 1);
  const int64_t sweep_smem = fwd_smem(kBucket, kFwdChunk).states_only * 4;  // no q, no A
  PYATTN_LAUNCH(kernel, sweep_grid, kLinThreads, sweep_smem, stream)(states_only, first);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.out == nullptr) return err;
  LinearFwdParams output_only = p;
  output_only.final_s = nullptr;
  output_only.final_z = nullptr;
  lin::SweepArgs second;
  second.in_states = first.states;
  second.in_zstates = first.zstates;
  const dim3 chunk_grid(static_cast<unsigned>(plan.grid[0]), nvt, 1);
  PYATTN_LAUNCH(kernel, chunk_grid, kLinThreads, smem, stream)(output_only, second);
  return cudaGetLastError();
}

#define PYATTN_LINEAR_FWD(T, B)                                                            \
  template cudaError_t linear_chunk_fwd<T, B>(const LinearFwdParams&, const LaunchPlan&, \
                                              float*, cudaStream_t);
PYATTN_LINEAR_FWD(float, 64)
PYATTN_LINEAR_FWD(float, 128)
PYATTN_LINEAR_FWD(__half, 64)
PYATTN_LINEAR_FWD(__half, 128)
PYATTN_LINEAR_FWD(__nv_bfloat16, 64)
PYATTN_LINEAR_FWD(__nv_bfloat16, 128)
#undef PYATTN_LINEAR_FWD

}  // namespace cuda
}  // namespace pyattn
