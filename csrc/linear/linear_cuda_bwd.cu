// CUDA chunked causal linear-recurrent attention, backward (shared/API.md section 2).
//
// Four kernels on the stream (workspace layout: BwdWorkspace in linear_cuda_plan.h):
//   1. chunk_fwd_kernel (linear_cuda_common.cuh) without output, grid (B*Hq, value tiles):
//      the state entering every chunk of bwd_chunk(kBucket) tokens (S_c, z_c), and per token
//      r_t = 1 / (den_t + eps) and each value tile's part of dout_t . o_t.
//   2. dstate_sweep_kernel, grid (B*Hq, value tiles): walks the chunks backwards carrying the
//      gradient of the state (dS, dz), saving the one leaving every chunk, and writes the
//      initial state's gradient at the end.
//   3. chunk_bwd_kernel, one CTA per (B*Hq, chunk), all chunks in parallel: dq, dk, dv and
//      dlog_decay of the chunk from S_c, z_c, dS, dz. Products are register-tiled SIMT
//      float32 FMAs (no tensor cores).
//   4. GQA only (Hq > Hkv): kernel 3 writes float32 dk / dv partials per query head into the
//      workspace and reduce_group_kernel sums each kv head's group into dk / dv
//      (deterministic, no atomics). With Hq == Hkv dk / dv are written directly.

#include "linear_cuda_common.cuh"
#include "linear_cuda_kernels.h"

namespace pyattn {
namespace cuda {
namespace lin {

template <int kBucket>
struct DsweepLayout {
  static constexpr DsweepSmem m() { return dsweep_smem(kBucket); }
  static constexpr int64_t q = m().q, dout = m().dout, ds = m().ds, dz = m().dz, lhi = m().lhi,
                           llo = m().llo, g = m().g, w = m().w, dd = m().dd, scal = m().scal,
                           total = m().total;
  static constexpr int chunk = bwd_chunk(kBucket);
};

// The gradient of the state, backwards over the chunks (one CTA per (b * Hq + h, value tile
// of 64 columns)), from dS, dz = the final state's gradient:
//   save dS, dz (the gradient of the state leaving chunk c), then
//   dS <- G dS + (g * qf)^T (r * dout),   dz <- G dz + (g * qf)^T dd,
//   dd_t = -(dout_t . o_t) r_t^2 (0 without normalize), dout . o summed over the value tiles.
// At the end dS, dz is the initial state's gradient.
template <typename T, int kBucket>
__global__ void __launch_bounds__(kLinThreads)
    dstate_sweep_kernel(const LinearBwdParams bp, const float* rws, const float* dnws,
                        float* dstates, float* dzstates) {
  using kL = DsweepLayout<kBucket>;
  constexpr int C = kL::chunk, LD = kBucket + 1, BV = kFwdBV, MF = kBucket / 16, NV = BV / 16;
  PYATTN_DYNAMIC_SMEM(float, sm);
  float* qs = sm + kL::q;
  float* dos = sm + kL::dout;
  float* dSs = sm + kL::ds;
  float* dz = sm + kL::dz;
  float* lhi = sm + kL::lhi;
  float* llo = sm + kL::llo;
  float* gs = sm + kL::g;
  float* ws = sm + kL::w;
  float* dds = sm + kL::dd;
  float* scal = sm + kL::scal;

  const LinearFwdParams& p = bp.fwd;
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15, warp = tid >> 5;
  const int64_t bh = blockIdx.x, b = bh / p.heads_q, h = bh % p.heads_q;
  const int F = static_cast<int>(p.feat), Dv = static_cast<int>(p.dim_v);
  const int c0 = blockIdx.y * BV;
  const int ncols = Dv - c0 < BV ? Dv - c0 : BV;
  const int nvt = gridDim.y;
  const int64_t nc = (p.seq + C - 1) / C;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* dout = bp.dout != nullptr ? static_cast<const T*>(bp.dout) + b * bp.dout_stride[0] +
                                           h * bp.dout_stride[1] + c0 * bp.dout_stride[3]
                                     : nullptr;
  const float* ld = p.log_decay != nullptr
                        ? p.log_decay + b * p.decay_stride[0] + h * p.decay_stride[1]
                        : nullptr;
  const float* r = rws + bh * p.seq;

  load_state_slice<kBucket, BV>(dSs, dz, bp.dfinal_s, bp.dfinal_s_stride, bp.dfinal_z, bp.dfinal_z_stride, b, h,
                                F, c0, ncols, tid);
  __syncthreads();

  for (int64_t ci = nc - 1; ci >= 0; --ci) {
    const int64_t t0 = ci * C;
    const int n = p.seq - t0 < C ? static_cast<int>(p.seq - t0) : C;
    {
      float* dst = dstates + (bh * nc + ci) * F * Dv + c0;
      for (int i = tid; i < F * BV; i += blockDim.x) {
        const int f = i / BV, c = i - f * BV;
        if (c < ncols) dst[static_cast<int64_t>(f) * Dv + c] = dSs[f * BV + c];
      }
      if (blockIdx.y == 0) {
        for (int f = tid; f < F; f += blockDim.x) dzstates[(bh * nc + ci) * F + f] = dz[f];
      }
    }
    load_tile(qs, LD, C, kBucket, q + t0 * p.q_stride[2], p.q_stride[2], p.q_stride[3], n, F,
              p.feature_map, p.scale);
    for (int i = tid; i < C * BV; i += blockDim.x) {
      const int t = i / BV, c = i - t * BV;
      float x = 0.0f;
      if (dout != nullptr && t < n && c < ncols) {
        x = to_float(dout[(t0 + t) * bp.dout_stride[2] + c * bp.dout_stride[3]]) * r[t0 + t];
      }
      dos[i] = x;
    }
    for (int t = tid; t < C; t += blockDim.x) {
      float dd = 0.0f;
      if (p.normalize && t < n) {
        float dn = 0.0f;
        for (int vt = 0; vt < nvt; ++vt) dn += dnws[(bh * nvt + vt) * p.seq + t0 + t];
        const float rt = r[t0 + t];
        dd = -dn * rt * rt;
      }
      dds[t] = dd;
    }
    if (warp == 0) {
      chunk_decay_warp<C>(ld != nullptr ? ld + t0 * p.decay_stride[2] : nullptr,
                          p.decay_stride[2], n, lhi, llo, gs, ws, scal);
    }
    __syncthreads();

    const float G = scal[0];
    float acc[MF][NV];
#pragma unroll
    for (int i = 0; i < MF; ++i) {
#pragma unroll
      for (int j = 0; j < NV; ++j) acc[i][j] = G * dSs[(ty + 16 * i) * BV + tx + 16 * j];
    }
    tile_product(acc, 0, n, [&](int f, int t) { return qs[t * LD + f] * gs[t]; },
                 [&](int t, int c) { return dos[t * BV + c]; });
#pragma unroll
    for (int i = 0; i < MF; ++i) {
#pragma unroll
      for (int j = 0; j < NV; ++j) dSs[(ty + 16 * i) * BV + tx + 16 * j] = acc[i][j];
    }
    for (int f = tid; f < kBucket; f += blockDim.x) {
      float x = 0.0f;
      for (int t = 0; t < n; ++t) x += gs[t] * qs[t * LD + f] * dds[t];
      dz[f] = G * dz[f] + x;
    }
    __syncthreads();
  }

  if (bp.dstate_s != nullptr) {
    for (int i = tid; i < F * BV; i += blockDim.x) {
      const int f = i / BV, c = i - f * BV;
      if (c < ncols) {
        bp.dstate_s[b * bp.dstate_s_stride[0] + h * bp.dstate_s_stride[1] +
                    f * bp.dstate_s_stride[2] + (c0 + c) * bp.dstate_s_stride[3]] = dSs[f * BV + c];
      }
    }
  }
  if (bp.dstate_z != nullptr && blockIdx.y == 0) {
    for (int f = tid; f < F; f += blockDim.x) {
      const int64_t at = b * bp.dstate_z_stride[0] + h * bp.dstate_z_stride[1];
      bp.dstate_z[at + f * bp.dstate_z_stride[2]] = dz[f];
    }
  }
}

template <int kBucket>
struct BwdLayout {
  static constexpr BwdSmem m() { return bwd_smem(kBucket); }
  static constexpr int64_t q = m().q, k = m().k, v = m().v, dout = m().dout, s = m().s,
                           a = m().a, p = m().p, mm = m().m, zc = m().zc,
                           dz = m().dz, lhi = m().lhi, llo = m().llo, g = m().g, w = m().w,
                           r = m().r, dd = m().dd, qu = m().qu, dlin = m().dlin,
                           dlout = m().dlout, blk = m().blk, red = m().red, scal = m().scal,
                           total = m().total;
  static constexpr int chunk = bwd_chunk(kBucket);
};

// One CTA per (b * Hq + h, chunk c), with S_c, z_c the state entering the chunk, dS, dz the
// gradient of the state leaving it (kernels 1 and 2), r_t = 1 / (den_t + eps) and
// dd_t = -(dout_t . o_t) r_t^2 (r = 1, dd = 0 without normalize; o the unnormalized output),
// D[t,s] = exp(L_t - L_s) [s <= t]:
//   A   = (qf kf^T) * D,  E = dout V^T,  U = dout S_c^T
//   den = g * (qf . z_c) + rowsum(A),   dout . o_t = g_t qf_t . U_t + sum_s A[t,s] E[t,s]
//   dO  = r * dout,   dP = (r * E + dd) * D
//   dqf = g * (r U + dd z_c) + dP kf
//   dkf = w * (V dS^T + dz) + dP^T qf
//   dv  = A^T dO + (w * kf) dS
// then dq = dqf * scale * f'(q), dk = dkf * f'(k). The log decay l_r moves L_t for t >= r
// inside its chunk (later chunks see it only through the state, which dS carries):
//   dlog_r = G (<dS, S_c> + <dz, z_c>)                   (G = exp(L_last))
//          + sum_{s < r} w_s kf_s . (dS v_s + dz)        (w_s = exp(L_last - L_s))
//          + sum_{t >= r} g_t qf_t . (r_t U_t + dd_t z_c) (g_t = exp(L_t))
//          + sum_{t >= r} sum_{s < r} M[t,s],   M = (r E + dd) * A   (the D[t,s] paths)
// each a sum of terms computed where their products are, never a difference of totals.
template <typename T, int kBucket>
__global__ void __launch_bounds__(kLinThreads)
    chunk_bwd_kernel(const LinearBwdParams bp, const float* states, const float* zstates,
                     const float* dstates, const float* dzstates, float* dk_part, float* dv_part) {
  using kL = BwdLayout<kBucket>;
  constexpr int C = kL::chunk, LD = kBucket + 1, CL = C + 1;
  constexpr int MC = C / 16, MB = kBucket / 16, kWarps = kLinThreads / 32;
  PYATTN_DYNAMIC_SMEM(float, sm);
  float* qs = sm + kL::q;
  float* ks = sm + kL::k;
  float* vs = sm + kL::v;
  float* dos = sm + kL::dout;
  float* Ss = sm + kL::s;   // S_c in phases 1-2
  float* dSs = sm + kL::s;  // dS from phase 3 on
  float* As = sm + kL::a;
  float* Ps = sm + kL::p;
  float* Ms = sm + kL::mm;
  float* zc = sm + kL::zc;
  float* dz = sm + kL::dz;
  float* lhi = sm + kL::lhi;
  float* llo = sm + kL::llo;
  float* gs = sm + kL::g;
  float* ws = sm + kL::w;
  float* rs = sm + kL::r;
  float* dds = sm + kL::dd;
  float* qu = sm + kL::qu;
  float* dlin = sm + kL::dlin;
  float* dlout = sm + kL::dlout;
  float* blk = sm + kL::blk;
  float* red = sm + kL::red;
  float* scal = sm + kL::scal;  // [0] G, [1] the dlog term through the chunk's state

  const LinearFwdParams& p = bp.fwd;
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15, warp = tid >> 5, lane = tid & 31;
  const int64_t nc = (p.seq + C - 1) / C;
  const int64_t bh = blockIdx.x / nc, ci = blockIdx.x % nc;
  const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
  const int64_t kvh = h / (p.heads_q / p.heads_kv);
  const int F = static_cast<int>(p.feat), Dv = static_cast<int>(p.dim_v);
  const bool identity = p.feature_map == LinearFwdParams::kIdentity;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + kvh * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + kvh * p.v_stride[1];
  const T* dout = bp.dout != nullptr ? static_cast<const T*>(bp.dout) + b * bp.dout_stride[0] +
                                           h * bp.dout_stride[1]
                                     : nullptr;
  const float* ld = p.log_decay != nullptr
                        ? p.log_decay + b * p.decay_stride[0] + h * p.decay_stride[1]
                        : nullptr;
  float* dlog = (bp.dlog_decay != nullptr && p.log_decay != nullptr)
                    ? bp.dlog_decay + b * bp.dlog_decay_stride[0] + h * bp.dlog_decay_stride[1]
                    : nullptr;
  T* dq = static_cast<T*>(bp.dq) + b * bp.dq_stride[0] + h * bp.dq_stride[1];
  T* dk = static_cast<T*>(bp.dk) + b * bp.dk_stride[0] + kvh * bp.dk_stride[1];
  T* dv = static_cast<T*>(bp.dv) + b * bp.dv_stride[0] + kvh * bp.dv_stride[1];
  if (dk_part != nullptr) {
    dk_part += bh * p.seq * F;
    dv_part += bh * p.seq * Dv;
  }

  {
    const int64_t t0 = ci * C;
    const int n = p.seq - t0 < C ? static_cast<int>(p.seq - t0) : C;

    // ---- 1. chunk inputs, S_c, z_c, dz, decay
    load_tile(qs, LD, C, kBucket, q + t0 * p.q_stride[2], p.q_stride[2], p.q_stride[3], n, F,
              p.feature_map, p.scale);
    load_tile(ks, LD, C, kBucket, k + t0 * p.k_stride[2], p.k_stride[2], p.k_stride[3], n, F,
              p.feature_map, 1.0f);
    load_tile(vs, LD, C, kBucket, v + t0 * p.v_stride[2], p.v_stride[2], p.v_stride[3], n, Dv,
              LinearFwdParams::kIdentity, 1.0f);
    load_tile(dos, LD, C, kBucket, dout != nullptr ? dout + t0 * bp.dout_stride[2] : dout,
              bp.dout_stride[2], bp.dout_stride[3], n, Dv, LinearFwdParams::kIdentity, 1.0f);
    {
      const float* sc = states + (bh * nc + ci) * F * Dv;
      for (int i = tid; i < kBucket * LD; i += blockDim.x) {
        const int f = i / LD, c = i - f * LD;
        Ss[i] = (f < F && c < Dv) ? sc[f * Dv + c] : 0.0f;
      }
      for (int f = tid; f < kBucket; f += blockDim.x) {
        zc[f] = f < F ? zstates[(bh * nc + ci) * F + f] : 0.0f;
      }
      for (int f = tid; f < kBucket; f += blockDim.x) {
        dz[f] = f < F ? dzstates[(bh * nc + ci) * F + f] : 0.0f;
      }
    }
    if (warp == 0) {
      chunk_decay_warp<C>(ld != nullptr ? ld + t0 * p.decay_stride[2] : nullptr,
                          p.decay_stride[2], n, lhi, llo, gs, ws, scal);
    }
    __syncthreads();

    // ---- 2. A, E (raw, lower), U (registers) and qf_t . U_t
    {
      float acc[MC][MC];
      zero_acc(acc);
      tile_product(acc, 0, F, [&](int r, int kk) { return qs[r * LD + kk]; },
                   [&](int kk, int c) { return ks[c * LD + kk]; });
#pragma unroll
      for (int i = 0; i < MC; ++i) {
#pragma unroll
        for (int j = 0; j < MC; ++j) {
          const int t = ty + 16 * i, s = tx + 16 * j;
          As[t * CL + s] = s <= t ? acc[i][j] * pair_weight(lhi[t], llo[t], lhi[s], llo[s]) : 0.0f;
        }
      }
      zero_acc(acc);
      tile_product(acc, 0, Dv, [&](int r, int kk) { return dos[r * LD + kk]; },
                   [&](int kk, int c) { return vs[c * LD + kk]; });
#pragma unroll
      for (int i = 0; i < MC; ++i) {
#pragma unroll
        for (int j = 0; j < MC; ++j) {
          const int t = ty + 16 * i, s = tx + 16 * j;
          Ps[t * CL + s] = s <= t ? acc[i][j] : 0.0f;
        }
      }
    }
    float u[MC][MB];  // U, then the inter-chunk part of dqf
    zero_acc(u);
    tile_product(u, 0, Dv, [&](int r, int kk) { return dos[r * LD + kk]; },
                 [&](int kk, int f) { return Ss[f * LD + kk]; });
#pragma unroll
    for (int i = 0; i < MC; ++i) {
      float x = 0.0f;
#pragma unroll
      for (int j = 0; j < MB; ++j) x += qs[(ty + 16 * i) * LD + tx + 16 * j] * u[i][j];
      x = half_warp_sum(x);
      if (tx == 0) qu[ty + 16 * i] = x;
    }
    // the decay's term through the chunk's state: <dS, S_c> + <dz, z_c> (dS read from the
    // workspace: its tile replaces S_c's below)
    const float* dsc = dstates + (bh * nc + ci) * F * Dv;
    if (dlog != nullptr) {
      float x = 0.0f;
      for (int i = tid; i < F * Dv; i += blockDim.x) {
        const int f = i / Dv, c = i - f * Dv;
        x += dsc[i] * Ss[f * LD + c];
      }
      for (int f = tid; f < F; f += blockDim.x) x += dz[f] * zc[f];
      x = warp_sum(x);
      if (lane == 0) red[warp] = x;
    }
    __syncthreads();

    // dS replaces S_c (phases 3 and 4 do not read either)
    for (int i = tid; i < kBucket * LD; i += blockDim.x) {
      const int f = i / LD, c = i - f * LD;
      dSs[i] = (f < F && c < Dv) ? dsc[f * Dv + c] : 0.0f;
    }

    // ---- 3. r_t, dd_t, one warp per row
    for (int t = warp; t < C; t += kWarps) {
      float den = 0.0f, dn = 0.0f, qz = 0.0f;
      for (int s = lane; s < C; s += 32) {
        const float a = As[t * CL + s];
        den += a;
        dn += a * Ps[t * CL + s];
      }
      for (int f = lane; f < F; f += 32) qz += qs[t * LD + f] * zc[f];
      den = warp_sum(den);
      dn = warp_sum(dn);
      qz = warp_sum(qz);
      if (lane == 0) {
        float r = 1.0f, dd = 0.0f;
        if (p.normalize) {
          r = 1.0f / (den + gs[t] * qz + p.eps);
          dd = -(dn + gs[t] * qu[t]) * r * r;
        }
        rs[t] = r;
        dds[t] = dd;
      }
    }
    __syncthreads();

    // ---- 4. dP and M in place of E; dO = r * dout; dqf's inter-chunk part and its dlog term
    for (int i = tid; i < C * C; i += blockDim.x) {
      const int t = i / C, s = i - t * C;
      const float da = Ps[t * CL + s] * rs[t] + dds[t];
      Ps[t * CL + s] = s <= t ? da * pair_weight(lhi[t], llo[t], lhi[s], llo[s]) : 0.0f;
      Ms[t * CL + s] = s < t ? da * As[t * CL + s] : 0.0f;
    }
    for (int i = tid; i < C * kBucket; i += blockDim.x) {
      const int t = i / kBucket, c = i - t * kBucket;
      dos[t * LD + c] *= rs[t];
    }
#pragma unroll
    for (int i = 0; i < MC; ++i) {
      const int t = ty + 16 * i;
      const float gt = gs[t], rt = rs[t], ddt = dds[t];
      float x = 0.0f;
#pragma unroll
      for (int j = 0; j < MB; ++j) {
        const int f = tx + 16 * j;
        u[i][j] = gt * (rt * u[i][j] + ddt * zc[f]);
        x += qs[t * LD + f] * u[i][j];
      }
      x = half_warp_sum(x);
      if (tx == 0) dlin[t] = x;
    }
    __syncthreads();

    // ---- 5a. dqf = inter + dP kf -> dq
    tile_product(u, 0, n, [&](int t, int s) { return Ps[t * CL + s]; },
                 [&](int s, int f) { return ks[s * LD + f]; });
#pragma unroll
    for (int i = 0; i < MC; ++i) {
      const int t = ty + 16 * i;
      if (t >= n) continue;
#pragma unroll
      for (int j = 0; j < MB; ++j) {
        const int f = tx + 16 * j;
        if (f >= F) continue;
        const int64_t tt = t0 + t;
        float x = u[i][j] * p.scale;
        if (!identity) {
          x *= fmap_grad(to_float(q[tt * p.q_stride[2] + f * p.q_stride[3]]), p.feature_map);
        }
        dq[tt * bp.dq_stride[2] + f * bp.dq_stride[3]] = from_float<T>(x);
      }
    }

    // ---- 5b. dv = (w * kf) dS + A^T dO
    {
      float acc[MC][MB];
      zero_acc(acc);
      tile_product(acc, 0, F, [&](int s, int f) { return ks[s * LD + f]; },
                   [&](int f, int c) { return dSs[f * LD + c]; });
#pragma unroll
      for (int i = 0; i < MC; ++i) {
        const float wt = ws[ty + 16 * i];
#pragma unroll
        for (int j = 0; j < MB; ++j) acc[i][j] *= wt;
      }
      tile_product(acc, 0, n, [&](int s, int t) { return As[t * CL + s]; },
                   [&](int t, int c) { return dos[t * LD + c]; });
#pragma unroll
      for (int i = 0; i < MC; ++i) {
        const int s = ty + 16 * i;
        if (s >= n) continue;
#pragma unroll
        for (int j = 0; j < MB; ++j) {
          const int c = tx + 16 * j;
          if (c >= Dv) continue;
          const int64_t tt = t0 + s;
          if (dv_part != nullptr) {
            dv_part[tt * Dv + c] = acc[i][j];
          } else {
            dv[tt * bp.dv_stride[2] + c * bp.dv_stride[3]] = from_float<T>(acc[i][j]);
          }
        }
      }
    }

    // ---- 5c. dkf = w * (V dS^T + dz) + dP^T qf -> dk, with kf . (its first part) for dlog
    {
      float acc[MC][MB];
      zero_acc(acc);
      tile_product(acc, 0, Dv, [&](int s, int c) { return vs[s * LD + c]; },
                   [&](int c, int f) { return dSs[f * LD + c]; });
#pragma unroll
      for (int i = 0; i < MC; ++i) {
        const int s = ty + 16 * i;
        const float wt = ws[s];
        float x = 0.0f;
#pragma unroll
        for (int j = 0; j < MB; ++j) {
          const int f = tx + 16 * j;
          acc[i][j] = wt * (acc[i][j] + dz[f]);
          x += ks[s * LD + f] * acc[i][j];
        }
        x = half_warp_sum(x);
        if (tx == 0) dlout[s] = x;
      }
      tile_product(acc, 0, n, [&](int s, int t) { return Ps[t * CL + s]; },
                   [&](int t, int f) { return qs[t * LD + f]; });
#pragma unroll
      for (int i = 0; i < MC; ++i) {
        const int s = ty + 16 * i;
        if (s >= n) continue;
#pragma unroll
        for (int j = 0; j < MB; ++j) {
          const int f = tx + 16 * j;
          if (f >= F) continue;
          const int64_t tt = t0 + s;
          float x = acc[i][j];
          if (!identity) {
            x *= fmap_grad(to_float(k[tt * p.k_stride[2] + f * p.k_stride[3]]), p.feature_map);
          }
          if (dk_part != nullptr) {
            dk_part[tt * F + f] = x;
          } else {
            dk[tt * bp.dk_stride[2] + f * bp.dk_stride[3]] = from_float<T>(x);
          }
        }
      }
    }

    // ---- 5d. the decay's in-chunk terms: row prefix sums of M, stored one column left:
    // Ms[t][r-1] = sum_{s<r} M[t][s] for 1 <= r <= t
    if (dlog != nullptr && tid < C) {
      float* row = Ms + tid * CL;
      double pre = 0.0;
      for (int r = 1; r <= tid; ++r) {
        pre += row[r - 1];
        row[r - 1] = static_cast<float>(pre);
      }
    }
    __syncthreads();

    // ---- 6. block[r] = sum_{t >= r} sum_{s < r} M[t][s] (column r - 1 of the prefix sums)
    if (dlog != nullptr && tid < C) {
      double x = 0.0;
      if (tid > 0) {
        for (int t = tid; t < C; ++t) x += Ms[t * CL + tid - 1];
      }
      blk[tid] = static_cast<float>(x);
      if (tid == 0) {
        float y = 0.0f;
        for (int i = 0; i < kWarps; ++i) y += red[i];
        scal[1] = scal[0] * y;
      }
    }
    __syncthreads();

    // ---- 7. dlog_r = scal[1] + sum_{s<r} dlout_s + sum_{t>=r} dlin_t + blk_r
    if (dlog != nullptr && tid == 0) {
      double pre = scal[1];
      for (int r = 0; r < n; ++r) {
        blk[r] = static_cast<float>(blk[r] + pre);
        pre += dlout[r];
      }
      double suf = 0.0;
      for (int r = n - 1; r >= 0; --r) {
        suf += dlin[r];
        dlog[(t0 + r) * bp.dlog_decay_stride[2]] = static_cast<float>(blk[r] + suf);
      }
    }
  }
}

// dst[b, kvh, t, c] = sum over the group's query heads g of part[b * Hq + kvh * group + g][t][c]
// (part: [B*Hq][S][cols] float32), one element per thread.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_group_kernel(const float* part, T* dst, int64_t s0, int64_t s1, int64_t s2, int64_t s3,
                        int64_t batch, int64_t heads_kv, int64_t group, int64_t seq, int64_t cols) {
  const int64_t total = batch * heads_kv * seq * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % cols, t = (i / cols) % seq, bk = i / (cols * seq);
    const int64_t b = bk / heads_kv, kvh = bk % heads_kv;
    const float* src = part + ((b * heads_kv + kvh) * group * seq + t) * cols + c;
    float x = 0.0f;
    for (int64_t g = 0; g < group; ++g) x += src[g * seq * cols];
    dst[b * s0 + kvh * s1 + t * s2 + c * s3] = from_float<T>(x);
  }
}

}  // namespace lin

template <typename T, int kBucket>
cudaError_t linear_chunk_bwd(const LinearBwdParams& bp, const LaunchPlan& plan, float* workspace,
                             cudaStream_t stream) {
  const LinearFwdParams& p = bp.fwd;
  const int64_t bh = p.batch * p.heads_q;
  if (plan.grid[0] == 0 || bh == 0) return cudaSuccess;
  constexpr int C = bwd_chunk(kBucket);
  const BwdWorkspace wl = bwd_workspace(p, kBucket);
  const dim3 tiles(static_cast<unsigned>(bh), static_cast<unsigned>(wl.nvt), 1);
  cudaError_t err;

  if (p.seq > 0) {  // 1. the state entering every chunk, r and dout . o per token
    LinearFwdParams fp = p;
    fp.out = nullptr;
    fp.final_s = nullptr;
    fp.final_z = nullptr;
    lin::SweepArgs sw;
    sw.states = workspace + wl.states;
    sw.zstates = workspace + wl.zs;
    sw.r = workspace + wl.r;
    sw.dn = workspace + wl.dn;
    sw.dout = bp.dout;
    for (int i = 0; i < 4; ++i) sw.dout_stride[i] = bp.dout_stride[i];
    auto kernel = lin::chunk_fwd_kernel<T, kBucket, C>;
    const int64_t smem = fwd_smem(kBucket, C).total * 4;
    err = lin::set_smem(reinterpret_cast<const void*>(kernel), smem);
    if (err != cudaSuccess) return err;
    PYATTN_LAUNCH(kernel, tiles, kLinThreads, smem, stream)(fp, sw);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }

  {  // 2. the gradient of the state leaving every chunk; the initial state's gradient
    auto kernel = lin::dstate_sweep_kernel<T, kBucket>;
    const int64_t smem = dsweep_smem(kBucket).total * 4;
    err = lin::set_smem(reinterpret_cast<const void*>(kernel), smem);
    if (err != cudaSuccess) return err;
    PYATTN_LAUNCH(kernel, tiles, kLinThreads, smem, stream)(bp, workspace + wl.r, workspace + wl.dn,
                                                            workspace + wl.dstates, workspace + wl.dzs);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.seq == 0) return cudaSuccess;

  {  // 3. every chunk's dq, dk, dv, dlog_decay
    auto kernel = lin::chunk_bwd_kernel<T, kBucket>;
    const int64_t smem = bwd_smem(kBucket).total * 4;
    err = lin::set_smem(reinterpret_cast<const void*>(kernel), smem);
    if (err != cudaSuccess) return err;
    float* dk_part = wl.gqa ? workspace + wl.dk_part : nullptr;
    float* dv_part = wl.gqa ? workspace + wl.dv_part : nullptr;
    const unsigned blocks = static_cast<unsigned>(bh * wl.nc);
    PYATTN_LAUNCH(kernel, blocks, kLinThreads, smem, stream)(bp, workspace + wl.states, workspace + wl.zs,
                                                             workspace + wl.dstates, workspace + wl.dzs,
                                                             dk_part, dv_part);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }

  if (wl.gqa) {  // 4. dk, dv: sum the group's float32 partials
    const int64_t group = p.heads_q / p.heads_kv;
    const int64_t rows = p.batch * p.heads_kv * p.seq;
    const int64_t blocks_max = 8 * 132;  // grid-stride: a few waves of any GPU are enough
    int64_t blocks = cdiv64(rows * p.feat, kReduceThreads);
    blocks = blocks < blocks_max ? blocks : blocks_max;
    PYATTN_LAUNCH(lin::reduce_group_kernel<T>, static_cast<unsigned>(blocks), kReduceThreads, 0, stream)(
        workspace + wl.dk_part, static_cast<T*>(bp.dk), bp.dk_stride[0], bp.dk_stride[1],
        bp.dk_stride[2], bp.dk_stride[3], p.batch, p.heads_kv, group, p.seq, p.feat);
    blocks = cdiv64(rows * p.dim_v, kReduceThreads);
    blocks = blocks < blocks_max ? blocks : blocks_max;
    PYATTN_LAUNCH(lin::reduce_group_kernel<T>, static_cast<unsigned>(blocks), kReduceThreads, 0, stream)(
        workspace + wl.dv_part, static_cast<T*>(bp.dv), bp.dv_stride[0], bp.dv_stride[1],
        bp.dv_stride[2], bp.dv_stride[3], p.batch, p.heads_kv, group, p.seq, p.dim_v);
  }
  return cudaGetLastError();
}

#define PYATTN_LINEAR_BWD(T, B)                                                             \
  template cudaError_t linear_chunk_bwd<T, B>(const LinearBwdParams&, const LaunchPlan&, \
                                              float*, cudaStream_t);
PYATTN_LINEAR_BWD(float, 64)
PYATTN_LINEAR_BWD(float, 128)
PYATTN_LINEAR_BWD(__half, 64)
PYATTN_LINEAR_BWD(__half, 128)
PYATTN_LINEAR_BWD(__nv_bfloat16, 64)
PYATTN_LINEAR_BWD(__nv_bfloat16, 128)
#undef PYATTN_LINEAR_BWD

}  // namespace cuda
}  // namespace pyattn
