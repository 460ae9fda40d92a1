// Forward head kernels of the CPU linear attention (one (batch, query head) per call).
//
// Causal, chunked (C = kChunk tokens; qf = f(q) * scale, kf = f(k), L the in-chunk
// cumulative log decay, g_t = exp(L_t), w_s = exp(L_last - L_s), G = exp(L_last)):
//
//   A     = (qf kf^T) * exp(L_t - L_s) [s <= t]           C x C, below the diagonal only
//   o     = [g*qf | A] [S; V]                              one product, K = F + C
//   d     = g * (qf . z) + rowsum(A)                       out = o / (d + eps) (normalize)
//   S    <- G S + kf^T (w * V),   z <- G z + kf^T w        float32 state, chunk to chunk
//
// Non-causal: S = S0 + kf^T V and z = z0 + sum kf over all chunks first, then o = qf S.
// Short inputs (decoding) run the recurrence token by token on the state in place.
#pragma once

#include "linear_cpu.h"
#include "linear_cpu_tiles.h"

namespace pyattn {
namespace cpu {
namespace PYATTN_ISA {

constexpr int64_t kRecurrentMaxSeq = 4;  // at most this many tokens: token loop

struct FwdScratch {
  float *qa, *kf, *kt, *sv, *vw, *o, *z, *L, *g, *w, *d;
};

inline FwdScratch fwd_carve(const LinearFwdParams& p, float* base, size_t* floats) {
  const int64_t C = kChunk, Fp = pad16(p.feat), Dvp = pad16(p.dim_v);
  Bump m{base};
  FwdScratch s;
  s.qa = m.take(C * (Fp + C));
  s.kf = m.take(C * Fp);
  s.kt = m.take(Fp * C);
  s.sv = m.take((Fp + C) * Dvp);
  s.vw = m.take(C * Dvp);
  s.o = m.take(C * Dvp);
  s.z = m.take(Fp);
  s.L = m.take(2 * C);
  s.g = m.take(C);
  s.w = m.take(C);
  s.d = m.take(C);
  if (floats != nullptr) *floats = m.used;
  return s;
}

inline size_t fwd_scratch_floats(const LinearFwdParams& p) {
  size_t n = 0;
  fwd_carve(p, nullptr, &n);
  return n;
}

struct HeadView {
  int64_t b, h, kvh, F, Dv, Fp, Dvp;
};

inline HeadView head_view(const LinearFwdParams& p, int64_t b, int64_t h) {
  HeadView v;
  v.b = b;
  v.h = h;
  v.kvh = h / (p.heads_q / p.heads_kv);
  v.F = p.feat;
  v.Dv = p.dim_v;
  v.Fp = pad16(p.feat);
  v.Dvp = pad16(p.dim_v);
  return v;
}

// Loads rows [t0, t0 + n) of q (mapped, * scale), k (mapped) or v into chunk buffers.
inline void load_q(const LinearFwdParams& p, const HeadView& hv, int64_t t0, int64_t n, float* dst,
                   int64_t ld, float* deriv, float dmul) {
  pack_mapped(p.dtype, dst, ld, kChunk, offset(p.q, p.dtype, off4(p.q_stride, hv.b, hv.h, t0)), n,
              p.q_stride[2], hv.F, p.q_stride[3], p.feature_map, p.scale, deriv, dmul);
}
inline void load_k(const LinearFwdParams& p, const HeadView& hv, int64_t t0, int64_t n, float* dst,
                   float* deriv) {
  pack_mapped(p.dtype, dst, hv.Fp, kChunk,
              offset(p.k, p.dtype, off4(p.k_stride, hv.b, hv.kvh, t0)), n, p.k_stride[2], hv.F,
              p.k_stride[3], p.feature_map, 1.0f, deriv, 1.0f);
}
inline void load_v(const LinearFwdParams& p, const HeadView& hv, int64_t t0, int64_t n, float* dst) {
  pack_plain(p.dtype, dst, hv.Dvp, kChunk,
             offset(p.v, p.dtype, off4(p.v_stride, hv.b, hv.kvh, t0)), n, p.v_stride[2], hv.Dv,
             p.v_stride[3]);
}

// Head hv's rows of a (B, H, ...) float32 state tensor with element strides st, or null.
template <typename T>
inline T* head_state(T* base, const int64_t* st, const HeadView& hv) {
  return base != nullptr ? base + hv.b * st[0] + hv.h * st[1] : nullptr;
}

// (s (B, H, F, Dv), z (B, H, F)) of head hv (null: zeros) -> the padded S, Z tiles.
inline void load_head_state(const HeadView& hv, const float* s, const int64_t* s_st, const float* z,
                            const int64_t* z_st, float* S, float* Z) {
  load_state(S, hv.Dvp, hv.Fp, head_state(s, s_st, hv), hv.F, s_st[2], hv.Dv, s_st[3]);
  load_state(Z, 1, hv.Fp, head_state(z, z_st, hv), hv.F, z_st[2], 1, 0);
}

// The padded S, Z tiles -> head hv's (s, z) (each skipped when null).
inline void save_head_state(const HeadView& hv, float* s, const int64_t* s_st, float* z,
                            const int64_t* z_st, const float* S, const float* Z) {
  save_state(head_state(s, s_st, hv), s_st[2], s_st[3], S, hv.Dvp, hv.F, hv.Dv);
  save_state(head_state(z, z_st, hv), z_st[2], 0, Z, 1, hv.F, 1);
}

inline void load_initial_state(const LinearFwdParams& p, const HeadView& hv, float* S, float* z) {
  load_head_state(hv, p.state_s, p.state_s_stride, p.state_z, p.state_z_stride, S, z);
}

inline void save_final_state(const LinearFwdParams& p, const HeadView& hv, const float* S,
                             const float* z) {
  save_head_state(hv, p.final_s, p.final_s_stride, p.final_z, p.final_z_stride, S, z);
}

// o rows [0, n) (ld) -> out rows [t0, t0 + n), divided by d + eps when normalizing.
inline void store_out(const LinearFwdParams& p, const HeadView& hv, int64_t t0, int64_t n, float* o,
                      int64_t ld, const float* d) {
  if (p.out == nullptr) return;
  if (p.normalize) {
    for (int64_t t = 0; t < n; ++t) scale_row(o + t * ld, hv.Dv, 1.0f / (d[t] + p.eps));
  }
  store_rows(p.dtype, offset(p.out, p.dtype, off4(p.out_stride, hv.b, hv.h, t0)),
             p.out_stride[2], p.out_stride[3], o, ld, n, hv.Dv, 1.0f);
}

// S (F x Dv, ld Dvp) <- G S + kt^T vw; z <- G z + kt w (w null: ones). kt is [Fp][C].
inline void state_update(const HeadView& hv, int64_t n, float G, const float* kt, const float* vw,
                         const float* w, float* S, float* z) {
  if (G != 1.0f) {
    for (int64_t f = 0; f < hv.F; ++f) scale_row(S + f * hv.Dvp, hv.Dv, G);
    for (int64_t f = 0; f < hv.F; ++f) z[f] *= G;
  }
  gemm<true>(hv.F, vecs(hv.Dv), n, kt, kChunk, 1, vw, hv.Dvp, S, hv.Dvp);
  for (int64_t f = 0; f < hv.F; ++f) {
    const float* row = kt + f * kChunk;
    float acc = 0.0f;
    if (w != nullptr) {
      for (int64_t s = 0; s < n; ++s) acc += row[s] * w[s];
    } else {
      for (int64_t s = 0; s < n; ++s) acc += row[s];
    }
    z[f] += acc;
  }
}

// The token loop (decoding): S <- a S + kf^T v and o = qf S in one pass over S per token.
inline void fwd_head_recurrent(const LinearFwdParams& p, const HeadView& hv, const FwdScratch& s) {
  float* S = s.sv;
  float* qf = s.qa;
  float* kf = s.kf;
  float* v = s.vw;
  float* o = s.o;
  load_initial_state(p, hv, S, s.z);
  const int nv = vecs(hv.Dv);
  for (int64_t t = 0; t < p.seq; ++t) {
    // one row each (the buffers hold kChunk rows; pack_mapped zero-fills them all)
    pack_mapped(p.dtype, qf, hv.Fp, 1, offset(p.q, p.dtype, off4(p.q_stride, hv.b, hv.h, t)), 1,
                p.q_stride[2], hv.F, p.q_stride[3], p.feature_map, p.scale, nullptr, 1.0f);
    pack_mapped(p.dtype, kf, hv.Fp, 1, offset(p.k, p.dtype, off4(p.k_stride, hv.b, hv.kvh, t)), 1,
                p.k_stride[2], hv.F, p.k_stride[3], p.feature_map, 1.0f, nullptr, 1.0f);
    pack_plain(p.dtype, v, hv.Dvp, 1, offset(p.v, p.dtype, off4(p.v_stride, hv.b, hv.kvh, t)), 1,
               p.v_stride[2], hv.Dv, p.v_stride[3]);
    const float a =
        p.log_decay != nullptr
            ? std::exp(p.log_decay[hv.b * p.decay_stride[0] + hv.h * p.decay_stride[1] +
                                   t * p.decay_stride[2]])
            : 1.0f;
    const vf va = splat(a);
    for (int j = 0; j < nv; ++j) at(o + j * kW) = vf{};
    float den = 0.0f;
    for (int64_t f = 0; f < hv.F; ++f) {
      float* row = S + f * hv.Dvp;
      const vf kv = splat(kf[f]), qv = splat(qf[f]);
      for (int j = 0; j < nv; ++j) {
        const vf x = va * at(row + j * kW) + kv * at(v + j * kW);
        at(row + j * kW) = x;
        at(o + j * kW) += qv * x;
      }
      s.z[f] = a * s.z[f] + kf[f];
      den += qf[f] * s.z[f];
    }
    s.d[0] = den;
    store_out(p, hv, t, 1, o, hv.Dvp, s.d);
  }
  save_final_state(p, hv, S, s.z);
}

inline void fwd_head_causal(const LinearFwdParams& p, const HeadView& hv, const FwdScratch& s) {
  const int64_t C = kChunk, F = hv.F, Fp = hv.Fp, Dv = hv.Dv, Dvp = hv.Dvp, lda = Fp + C;
  float* S = s.sv;
  float* V = s.sv + Fp * Dvp;
  float* A = s.qa + Fp;  // row t of A follows row t of g * qf
  float* o = s.o;
  load_initial_state(p, hv, S, s.z);
  for (int64_t t0 = 0; t0 < p.seq; t0 += C) {
    const int64_t n = min64(C, p.seq - t0);
    load_k(p, hv, t0, n, s.kf, nullptr);
    transpose(s.kt, C, s.kf, Fp, n, F);
    load_v(p, hv, t0, n, V);
    float G;
    const bool decay = chunk_decay(p, hv.b, hv.h, t0, n, s.L, s.g, s.w, &G);

    // Without out (the first pass of a split sequence, linear_cpu.cpp) only the state matters.
    if (p.out != nullptr) {
      load_q(p, hv, t0, n, s.qa, lda, nullptr, 1.0f);
      // A = P * weights below the diagonal, zero above (o's product reads up to each tile's end)
      gemm_tri<false, kLowerN>(n, n, F, 0, s.qa, lda, 1, s.kt, C, A, lda);
      for (int64_t t = 0; t < n; ++t) {
        float* row = A + t * lda;
        vf sum{};
        for_row_weights(t, n, s.L, decay, [&](int v, vi keep, vf wgt) {
          const vf x = keep ? at(row + v * kW) * wgt : vf{};
          at(row + v * kW) = x;
          sum += x;
        });
        float den = 0.0f;
        if (p.normalize) {
          for (int l = 0; l < kW; ++l) den += sum[l];
          den += (decay ? s.g[t] : 1.0f) * dot(s.qa + t * lda, s.z, F);
        }
        s.d[t] = den;
        if (decay) scale_row(s.qa + t * lda, F, s.g[t]);
      }

      gemm_tri<false, kLowerK>(n, Dv, Fp + n, Fp, s.qa, lda, 1, s.sv, Dvp, o, Dvp);
      store_out(p, hv, t0, n, o, Dvp, s.d);
    }

    const float* vw = V;
    if (decay) {
      for (int64_t t = 0; t < n; ++t) {
        const vf wt = splat(s.w[t]);
        for (int j = 0; j < vecs(Dv); ++j) at(s.vw + t * Dvp + j * kW) = wt * at(V + t * Dvp + j * kW);
      }
      vw = s.vw;
    }
    state_update(hv, n, G, s.kt, vw, decay ? s.w : nullptr, S, s.z);
  }
  save_final_state(p, hv, S, s.z);
}

inline void fwd_head_noncausal(const LinearFwdParams& p, const HeadView& hv, const FwdScratch& s) {
  const int64_t C = kChunk, F = hv.F, Fp = hv.Fp, Dv = hv.Dv, Dvp = hv.Dvp;
  float* S = s.sv;
  float* V = s.sv + Fp * Dvp;
  load_initial_state(p, hv, S, s.z);
  for (int64_t t0 = 0; t0 < p.seq; t0 += C) {
    const int64_t n = min64(C, p.seq - t0);
    load_k(p, hv, t0, n, s.kf, nullptr);
    transpose(s.kt, C, s.kf, Fp, n, F);
    load_v(p, hv, t0, n, V);
    state_update(hv, n, 1.0f, s.kt, V, nullptr, S, s.z);
  }
  float* o = s.o;
  for (int64_t t0 = 0; t0 < p.seq; t0 += C) {
    const int64_t n = min64(C, p.seq - t0);
    load_q(p, hv, t0, n, s.qa, Fp, nullptr, 1.0f);
    gemm_tri<false, kFull>(n, Dv, F, 0, s.qa, Fp, 1, S, Dvp, o, Dvp);
    for (int64_t t = 0; t < n; ++t) s.d[t] = p.normalize ? dot(s.qa + t * Fp, s.z, F) : 0.0f;
    store_out(p, hv, t0, n, o, Dvp, s.d);
  }
  save_final_state(p, hv, S, s.z);
}

inline void fwd_head(const LinearFwdParams& p, int64_t b, int64_t h, float* scratch) {
  const HeadView hv = head_view(p, b, h);
  const FwdScratch s = fwd_carve(p, scratch, nullptr);
  if (p.causal && p.seq <= kRecurrentMaxSeq) {
    fwd_head_recurrent(p, hv, s);
  } else if (p.causal) {
    fwd_head_causal(p, hv, s);
  } else {
    fwd_head_noncausal(p, hv, s);
  }
}

}  // namespace PYATTN_ISA
}  // namespace cpu
}  // namespace pyattn
