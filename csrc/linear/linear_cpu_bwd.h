// Backward head kernels of the CPU linear attention (one (batch, query head) per call).
//
// Causal: a first pass over the chunks recomputes the state entering each one (S_c, z_c,
// kept in scratch); a second pass walks the chunks backwards carrying dS, dz (the gradient
// of the state leaving the chunk, from the final state's gradient). Per chunk, with r_t =
// 1 / (d_t + eps) and dd_t = -(dout_t . o_t) r_t^2 (r = 1, dd = 0 without normalize):
//
//   E   = dout V^T,  U = dout S_c^T,  dout . o_t = g_t qf_t . U_t + sum_s A[t,s] E[t,s]
//   dO  = r * dout,  dP = (r * E + dd) * exp(L_t - L_s) [s <= t]
//   dqf = g * (r * U + dd z_c) + dP kf
//   dkf = dP^T qf + (w * V) dS^T + w dz          dv = A^T dO + (w * kf) dS
//   dS <- G dS + (g * qf)^T dO,  dz <- G dz + (g * qf)^T dd
//
// The log decay's gradient, per chunk, from the in-chunk sums L (l_r moves L_t for t >= r
// inside its chunk; later chunks see it only through the state, whose gradient dS carries):
//   dL_t = sum_{s<t} M[t,s] - sum_{s>t} M[s,t]      M = dA * A (the intra weights' paths;
//                                                   summed over t >= r: the block t >= r > s)
//        + qf_t . g_t (r_t U_t + dd_t z_c)          (the state entering the chunk)
//        - w_t kf_t . (dS v_t + dz)                 (the state leaving it ...)
//   dL_last += sum_s w_s kf_s . (dS v_s + dz) + G (<dS, S_c> + <dz, z_c>)
//   dlog_decay_r = sum_{t >= r in the chunk} dL_t.
// Each term is computed where its product already is; none is a difference of totals over
// the whole sequence, so a gradient that should be 0 comes out 0.
//
// Non-causal: S = S0 + kf^T V; dqf = r U + dd z, dS = dS_T + qf^T dO, dz = dz_T + qf^T dd;
// then dkf = V dS^T + dz, dv = kf dS.
#pragma once

#include "linear_cpu_fwd.h"

namespace pyattn {
namespace cpu {
namespace PYATTN_ISA {

struct BwdScratch {
  float *states, *zs;                       // per chunk: S_c [Fp][Dvp], z_c [Fp]
  float *qf, *qg, *dqm, *kf, *dkm, *kt;     // [C][Fp] (kt [Fp][C])
  float *v, *vt, *vw, *kw, *dout;           // [C][Dvp] (vt [Dvp][C]), kw [C][Fp]
  float *st, *dst, *u;                      // [Dvp][Fp], [Dvp][Fp], [C][Fp]
  float *A, *Dm, *E;                        // [C][C]
  float *dqf, *dkf, *dvb;                   // [C][Fp], [C][Fp], [C][Dvp]
  float *S, *z, *dS, *dz;                   // [Fp][Dvp], [Fp]
  float *L, *g, *w, *d, *r, *dd;            // [C] (L: 2 C)
  float *dl_in, *dl_out;                    // [C]
};

inline int64_t n_chunks(const LinearFwdParams& p) { return (p.seq + kChunk - 1) / kChunk; }

inline BwdScratch bwd_carve(const LinearBwdParams& bp, float* base, size_t* floats) {
  const LinearFwdParams& p = bp.fwd;
  const int64_t C = kChunk, Fp = pad16(p.feat), Dvp = pad16(p.dim_v);
  const int64_t nc = p.causal ? n_chunks(p) : 0;
  Bump m{base};
  BwdScratch s;
  s.states = m.take(nc * Fp * Dvp);
  s.zs = m.take(nc * Fp);
  float** per_f[] = {&s.qf, &s.qg, &s.dqm, &s.kf, &s.dkm, &s.kw, &s.u, &s.dqf, &s.dkf};
  for (float** x : per_f) *x = m.take(C * Fp);
  s.kt = m.take(Fp * C);
  float** per_dv[] = {&s.v, &s.vw, &s.dout, &s.dvb};
  for (float** x : per_dv) *x = m.take(C * Dvp);
  s.vt = m.take(Dvp * C);
  s.st = m.take(Dvp * Fp);
  s.dst = m.take(Dvp * Fp);
  float** per_c[] = {&s.A, &s.Dm, &s.E};
  for (float** x : per_c) *x = m.take(C * C);
  s.S = m.take(Fp * Dvp);
  s.dS = m.take(Fp * Dvp);
  s.z = m.take(Fp);
  s.dz = m.take(Fp);
  float** per_token[] = {&s.g, &s.w, &s.d, &s.r, &s.dd, &s.dl_in, &s.dl_out};
  s.L = m.take(2 * C);
  for (float** x : per_token) *x = m.take(C);
  if (floats != nullptr) *floats = m.used;
  return s;
}

inline size_t bwd_scratch_floats(const LinearBwdParams& bp) {
  size_t n = 0;
  bwd_carve(bp, nullptr, &n);
  return n;
}

// Gradient of the final state (null: zeros) into dS, dz.
inline void load_final_grad(const LinearBwdParams& bp, const HeadView& hv, float* dS, float* dz) {
  load_head_state(hv, bp.dfinal_s, bp.dfinal_s_stride, bp.dfinal_z, bp.dfinal_z_stride, dS, dz);
}

inline void save_initial_grad(const LinearBwdParams& bp, const HeadView& hv, const float* dS,
                              const float* dz) {
  save_head_state(hv, bp.dstate_s, bp.dstate_s_stride, bp.dstate_z, bp.dstate_z_stride, dS, dz);
}

inline void load_dout(const LinearBwdParams& bp, const HeadView& hv, int64_t t0, int64_t n,
                      float* dst) {
  const LinearFwdParams& p = bp.fwd;
  const void* src = bp.dout != nullptr
                        ? offset(bp.dout, p.dtype, off4(bp.dout_stride, hv.b, hv.h, t0))
                        : nullptr;
  pack_plain(p.dtype, dst, hv.Dvp, kChunk, src, n, bp.dout_stride[2], hv.Dv, bp.dout_stride[3]);
}

// x rows [0, n) (ld) times `mul` (same layout; null: the scalar mul1) -> dq / dk / dv rows
// [t0, t0 + n) of head h, or a float32 part (contiguous rows of `cols`) when part is not null.
inline void store_grad(const LinearFwdParams& p, void* dst, const int64_t* stride, int64_t b,
                       int64_t h, float* part, int64_t t0, int64_t n, float* x, const float* mul,
                       float mul1, int64_t ld, int64_t cols) {
  if (mul != nullptr) {
    for (int64_t r = 0; r < n; ++r) {
      for (int v = 0; v < vecs(cols); ++v) at(x + r * ld + v * kW) *= at(mul + r * ld + v * kW);
    }
    mul1 = 1.0f;
  }
  if (part != nullptr) {
    store_rows_t<kFloat32>(part + t0 * cols, cols, 1, x, ld, n, cols, mul1);
  } else {
    store_rows(p.dtype, offset(dst, p.dtype, off4(stride, b, h, t0)), stride[2], stride[3], x, ld,
               n, cols, mul1);
  }
}

inline void bwd_head_causal(const LinearBwdParams& bp, const HeadView& hv, const BwdScratch& s,
                            float* dk_part, float* dv_part) {
  const LinearFwdParams& p = bp.fwd;
  const int64_t C = kChunk, F = hv.F, Fp = hv.Fp, Dv = hv.Dv, Dvp = hv.Dvp;
  const int64_t nc = n_chunks(p);
  const bool identity = p.feature_map == LinearFwdParams::kIdentity;

  // Pass 1: the state entering each chunk.
  load_initial_state(p, hv, s.S, s.z);
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t t0 = c * C, n = min64(C, p.seq - t0);
    float* Sc = s.states + c * Fp * Dvp;
    for (int64_t i = 0; i < Fp * Dvp; ++i) Sc[i] = s.S[i];
    for (int64_t i = 0; i < Fp; ++i) s.zs[c * Fp + i] = s.z[i];
    load_k(p, hv, t0, n, s.kf, nullptr);
    transpose(s.kt, C, s.kf, Fp, n, F);
    load_v(p, hv, t0, n, s.v);
    float G;
    const bool decay = chunk_decay(p, hv.b, hv.h, t0, n, s.L, s.g, s.w, &G);
    if (decay) {
      for (int64_t t = 0; t < n; ++t) {
        for (int j = 0; j < vecs(Dv); ++j) {
          at(s.vw + t * Dvp + j * kW) = splat(s.w[t]) * at(s.v + t * Dvp + j * kW);
        }
      }
    }
    state_update(hv, n, G, s.kt, decay ? s.vw : s.v, decay ? s.w : nullptr, s.S, s.z);
  }

  // Pass 2: backwards over the chunks.
  load_final_grad(bp, hv, s.dS, s.dz);
  float* dlog = bp.dlog_decay != nullptr
                    ? bp.dlog_decay + hv.b * bp.dlog_decay_stride[0] + hv.h * bp.dlog_decay_stride[1]
                    : nullptr;
  const bool want_decay_grad = dlog != nullptr && p.log_decay != nullptr;
  for (int64_t c = nc - 1; c >= 0; --c) {
    const int64_t t0 = c * C, n = min64(C, p.seq - t0);
    const float* Sc = s.states + c * Fp * Dvp;
    const float* zc = s.zs + c * Fp;
    load_q(p, hv, t0, n, s.qf, Fp, identity ? nullptr : s.dqm, p.scale);
    load_k(p, hv, t0, n, s.kf, identity ? nullptr : s.dkm);
    load_v(p, hv, t0, n, s.v);
    load_dout(bp, hv, t0, n, s.dout);
    float G;
    const bool decay = chunk_decay(p, hv.b, hv.h, t0, n, s.L, s.g, s.w, &G);
    transpose(s.kt, C, s.kf, Fp, n, F);
    transpose(s.vt, C, s.v, Dvp, n, Dv);
    transpose(s.st, Fp, Sc, Dvp, F, Dv);

    // A = P * D (D kept for dP), E = dout V^T, U = dout S_c^T
    gemm_tri<false, kLowerN>(n, n, F, 0, s.qf, Fp, 1, s.kt, C, s.A, C);
    gemm_tri<false, kLowerN>(n, n, Dv, 0, s.dout, Dvp, 1, s.vt, C, s.E, C);
    gemm_tri<false, kFull>(n, F, Dv, 0, s.dout, Dvp, 1, s.st, Fp, s.u, Fp);
    for (int64_t t = 0; t < n; ++t) {
      float* a_row = s.A + t * C;
      float* e_row = s.E + t * C;
      float* d_row = s.Dm + t * C;
      vf sum_a{}, sum_ae{};
      for_row_weights(t, n, s.L, decay, [&](int v, vi keep, vf wgt) {
        const vf x = keep ? at(a_row + v * kW) * wgt : vf{};
        at(a_row + v * kW) = x;
        at(d_row + v * kW) = keep ? wgt : vf{};
        sum_a += x;
        sum_ae += keep ? x * at(e_row + v * kW) : vf{};
      });
      const float gt = decay ? s.g[t] : 1.0f;
      if (p.normalize) {
        float den = 0.0f, ou = 0.0f;
        for (int l = 0; l < kW; ++l) {
          den += sum_a[l];
          ou += sum_ae[l];
        }
        den += gt * dot(s.qf + t * Fp, zc, F);
        ou += gt * dot(s.qf + t * Fp, s.u + t * Fp, F);
        const float r = 1.0f / (den + p.eps);
        s.r[t] = r;
        s.dd[t] = -ou * r * r;
      } else {
        s.r[t] = 1.0f;
        s.dd[t] = 0.0f;
      }
      // dP row, in place of E (a select: E above the diagonal is not computed); M = dA * A
      // off the diagonal for the decay's gradient
      const vf rv = splat(s.r[t]), ddv = splat(s.dd[t]);
      const vi lane = iota_i();
      for (int v = 0; v < vecs(n); ++v) {
        const vi col = lane + v * kW;
        const vf da = at(e_row + v * kW) * rv + ddv;
        at(e_row + v * kW) = col <= static_cast<int32_t>(t) ? da * at(d_row + v * kW) : vf{};
        // M replaces D's row, no longer needed
        if (want_decay_grad) {
          at(d_row + v * kW) = col < static_cast<int32_t>(t) ? da * at(a_row + v * kW) : vf{};
        }
      }
      // dqf_t = g_t (r_t U_t + dd_t z_c); qg_t = g_t qf_t; dO_t = r_t dout_t
      const vf gv = splat(gt);
      for (int v = 0; v < vecs(F); ++v) {
        at(s.dqf + t * Fp + v * kW) = gv * (rv * at(s.u + t * Fp + v * kW) + ddv * at(zc + v * kW));
        at(s.qg + t * Fp + v * kW) = gv * at(s.qf + t * Fp + v * kW);
      }
      if (want_decay_grad) s.dl_in[t] = dot(s.qf + t * Fp, s.dqf + t * Fp, F);
      scale_row(s.dout + t * Dvp, Dv, s.r[t]);
    }
    float* dO = s.dout;
    gemm_tri<true, kLowerK>(n, F, n, 0, s.E, C, 1, s.kf, Fp, s.dqf, Fp);    // dqf += dP kf
    gemm_tri<false, kUpperK>(n, Dv, n, 0, s.A, 1, C, dO, Dvp, s.dvb, Dvp);  // dv = A^T dO

    // the paths through the state leaving the chunk
    const float* vw = s.v;
    const float* kw = s.kf;
    if (decay) {
      for (int64_t t = 0; t < n; ++t) {
        const vf wt = splat(s.w[t]);
        for (int j = 0; j < vecs(Dv); ++j) {
          at(s.vw + t * Dvp + j * kW) = wt * at(s.v + t * Dvp + j * kW);
        }
        for (int j = 0; j < vecs(F); ++j) {
          at(s.kw + t * Fp + j * kW) = wt * at(s.kf + t * Fp + j * kW);
        }
      }
      vw = s.vw;
      kw = s.kw;
    }
    transpose(s.dst, Fp, s.dS, Dvp, F, Dv);
    gemm_tri<false, kFull>(n, F, Dv, 0, vw, Dvp, 1, s.dst, Fp, s.dkf, Fp);   // (w V) dS^T
    gemm_tri<true, kFull>(n, Dv, F, 0, kw, Fp, 1, s.dS, Dvp, s.dvb, Dvp);    // += (w kf) dS
    for (int64_t t = 0; t < n; ++t) {
      const vf wt = splat(decay ? s.w[t] : 1.0f);
      for (int j = 0; j < vecs(F); ++j) at(s.dkf + t * Fp + j * kW) += wt * at(s.dz + j * kW);
    }

    if (want_decay_grad) {
      double last = 0.0;  // dL_{n-1}'s terms through the state leaving the chunk
      for (int64_t f = 0; f < F; ++f) {
        last += s.dz[f] * static_cast<double>(zc[f]) + dot(s.dS + f * Dvp, Sc + f * Dvp, Dv);
      }
      last *= G;
      for (int64_t t = 0; t < n; ++t) {
        s.dl_out[t] = dot(s.kf + t * Fp, s.dkf + t * Fp, F);  // w_t kf_t . (dS v_t + dz)
        last += s.dl_out[t];
      }
      // block[r] = sum_{t >= r} sum_{s < r} M[t, s], from each row's prefix sums
      double block[kChunk];
      for (int64_t r = 0; r < n; ++r) block[r] = 0.0;
      for (int64_t t = 1; t < n; ++t) {
        const float* m_row = s.Dm + t * C;
        double prefix = 0.0;
        for (int64_t r = 1; r <= t; ++r) {
          prefix += m_row[r - 1];
          block[r] += prefix;
        }
      }
      double acc = last;
      for (int64_t t = n - 1; t >= 0; --t) {
        acc += static_cast<double>(s.dl_in[t]) - s.dl_out[t];
        dlog[(t0 + t) * bp.dlog_decay_stride[2]] = static_cast<float>(acc + block[t]);
      }
    }
    gemm_tri<true, kUpperK>(n, F, n, 0, s.E, 1, C, s.qf, Fp, s.dkf, Fp);   // dkf += dP^T qf

    // dS <- G dS + qg^T dO, dz <- G dz + qg^T dd
    if (G != 1.0f) {
      for (int64_t f = 0; f < F; ++f) scale_row(s.dS + f * Dvp, Dv, G);
      scale_row(s.dz, F, G);
    }
    gemm<true>(F, vecs(Dv), n, s.qg, 1, Fp, dO, Dvp, s.dS, Dvp);
    for (int64_t t = 0; t < n; ++t) {
      const vf ddv = splat(s.dd[t]);
      for (int j = 0; j < vecs(F); ++j) at(s.dz + j * kW) += ddv * at(s.qg + t * Fp + j * kW);
    }

    store_grad(p, bp.dq, bp.dq_stride, hv.b, hv.h, nullptr, t0, n, s.dqf,
               identity ? nullptr : s.dqm, p.scale, Fp, F);
    store_grad(p, bp.dk, bp.dk_stride, hv.b, hv.kvh, dk_part, t0, n, s.dkf,
               identity ? nullptr : s.dkm, 1.0f, Fp, F);
    store_grad(p, bp.dv, bp.dv_stride, hv.b, hv.kvh, dv_part, t0, n, s.dvb, nullptr, 1.0f, Dvp, Dv);
  }
  save_initial_grad(bp, hv, s.dS, s.dz);
}

inline void bwd_head_noncausal(const LinearBwdParams& bp, const HeadView& hv, const BwdScratch& s,
                               float* dk_part, float* dv_part) {
  const LinearFwdParams& p = bp.fwd;
  const int64_t C = kChunk, F = hv.F, Fp = hv.Fp, Dv = hv.Dv, Dvp = hv.Dvp;
  const bool identity = p.feature_map == LinearFwdParams::kIdentity;
  load_initial_state(p, hv, s.S, s.z);
  for (int64_t t0 = 0; t0 < p.seq; t0 += C) {
    const int64_t n = min64(C, p.seq - t0);
    load_k(p, hv, t0, n, s.kf, nullptr);
    transpose(s.kt, C, s.kf, Fp, n, F);
    load_v(p, hv, t0, n, s.v);
    state_update(hv, n, 1.0f, s.kt, s.v, nullptr, s.S, s.z);
  }
  load_final_grad(bp, hv, s.dS, s.dz);
  transpose(s.st, Fp, s.S, Dvp, F, Dv);
  for (int64_t t0 = 0; t0 < p.seq; t0 += C) {
    const int64_t n = min64(C, p.seq - t0);
    load_q(p, hv, t0, n, s.qf, Fp, identity ? nullptr : s.dqm, p.scale);
    load_dout(bp, hv, t0, n, s.dout);
    gemm_tri<false, kFull>(n, F, Dv, 0, s.dout, Dvp, 1, s.st, Fp, s.u, Fp);
    for (int64_t t = 0; t < n; ++t) {
      float r = 1.0f, dd = 0.0f;
      if (p.normalize) {
        r = 1.0f / (dot(s.qf + t * Fp, s.z, F) + p.eps);
        dd = -dot(s.qf + t * Fp, s.u + t * Fp, F) * r * r;
      }
      s.dd[t] = dd;
      const vf rv = splat(r), ddv = splat(dd);
      for (int v = 0; v < vecs(F); ++v) {
        at(s.dqf + t * Fp + v * kW) = rv * at(s.u + t * Fp + v * kW) + ddv * at(s.z + v * kW);
      }
      scale_row(s.dout + t * Dvp, Dv, r);
    }
    // dS_total += qf^T dO, dz_total += qf^T dd (applied to every token: the running sums
    // start from the final state's gradient)
    gemm<true>(F, vecs(Dv), n, s.qf, 1, Fp, s.dout, Dvp, s.dS, Dvp);
    for (int64_t t = 0; t < n; ++t) {
      const vf ddv = splat(s.dd[t]);
      for (int j = 0; j < vecs(F); ++j) at(s.dz + j * kW) += ddv * at(s.qf + t * Fp + j * kW);
    }
    store_grad(p, bp.dq, bp.dq_stride, hv.b, hv.h, nullptr, t0, n, s.dqf,
               identity ? nullptr : s.dqm, p.scale, Fp, F);
  }
  transpose(s.dst, Fp, s.dS, Dvp, F, Dv);
  for (int64_t t0 = 0; t0 < p.seq; t0 += C) {
    const int64_t n = min64(C, p.seq - t0);
    load_k(p, hv, t0, n, s.kf, identity ? nullptr : s.dkm);
    load_v(p, hv, t0, n, s.v);
    gemm_tri<false, kFull>(n, F, Dv, 0, s.v, Dvp, 1, s.dst, Fp, s.dkf, Fp);
    for (int64_t t = 0; t < n; ++t) {
      for (int j = 0; j < vecs(F); ++j) at(s.dkf + t * Fp + j * kW) += at(s.dz + j * kW);
    }
    gemm_tri<false, kFull>(n, Dv, F, 0, s.kf, Fp, 1, s.dS, Dvp, s.dvb, Dvp);
    store_grad(p, bp.dk, bp.dk_stride, hv.b, hv.kvh, dk_part, t0, n, s.dkf,
               identity ? nullptr : s.dkm, 1.0f, Fp, F);
    store_grad(p, bp.dv, bp.dv_stride, hv.b, hv.kvh, dv_part, t0, n, s.dvb, nullptr, 1.0f, Dvp, Dv);
  }
  save_initial_grad(bp, hv, s.dS, s.dz);
}

inline void bwd_head(const LinearBwdParams& bp, int64_t b, int64_t h, float* scratch,
                     float* dk_part, float* dv_part) {
  const HeadView hv = head_view(bp.fwd, b, h);
  const BwdScratch s = bwd_carve(bp, scratch, nullptr);
  if (bp.fwd.causal) {
    bwd_head_causal(bp, hv, s, dk_part, dv_part);
  } else {
    bwd_head_noncausal(bp, hv, s, dk_part, dv_part);
  }
}

}  // namespace PYATTN_ISA
}  // namespace cpu
}  // namespace pyattn
