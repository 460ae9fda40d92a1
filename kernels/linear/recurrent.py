"""Fused recurrent linear attention forward: the token loop itself, for short inputs and the
one-token decoding step.

One program holds the whole feature dim of a block of value columns of the state in float32
registers and walks the tokens::

    S = a_t S + kf_t^T v_t        z = a_t z + kf_t        (causal; a_t = exp(g_t))
    out_t = qf_t S / (qf_t . z + eps)                       (qf_t S without normalize)

Non-causal: a first pass sums the state over every token, a second one reads it. Memory is the
state and nothing per token; no matmul, so no block needs 16 rows. The denominator needs every
feature, which each program has.
"""
import triton
import triton.language as tl

from ._common import load_features


@triton.jit(do_not_specialize=["heads", "group", "seq"])
def recurrent_forward_kernel(
        Q, K, V, G, S0, Z0, OUT, S_OUT, Z_OUT,
        stride_qb, stride_qh, stride_qt, stride_qf,
        stride_kb, stride_kh, stride_kt, stride_kf,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_gb, stride_gh, stride_gt,
        stride_s0b, stride_s0h, stride_s0f, stride_s0d,
        stride_z0b, stride_z0h, stride_z0f,
        stride_ob, stride_oh, stride_ot, stride_od,
        heads, group, seq, scale, eps,
        F: tl.constexpr, DV: tl.constexpr, FMAP: tl.constexpr, CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr,
        HAS_INITIAL: tl.constexpr, NORMALIZE: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr):
    """Per token: ``S = a_t S + kf_t^T v_t``, ``z = a_t z + kf_t``, ``out_t = qf_t S / (qf_t . z + eps)``.

    Grid ``(cdiv(DV, BV), B * Hq)``. q (B, Hq, S, F), k (B, Hkv, S, F), v (B, Hkv, S, DV),
    g (B, Hq, S), S0 (B, Hq, F, DV), Z0 (B, Hq, F), out (B, Hq, S, DV), any strides; writes the
    final state to ``S_OUT`` (B*Hq, F, DV) / ``Z_OUT`` (B*Hq, F), contiguous float32."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // heads, i_bh % heads
    i_hk = i_h // group
    offs_f = tl.arange(0, BF)                                                            # [BF]
    offs_d = i_v * BV + tl.arange(0, BV)                                                 # [BV]
    m_f = offs_f < F
    m_d = offs_d < DV
    m_fd = m_f[:, None] & m_d[None, :]

    b_s = tl.zeros([BF, BV], dtype=tl.float32)                                          # [BF, BV]
    b_z = tl.zeros([BF], dtype=tl.float32)                                               # [BF]
    if HAS_INITIAL:
        s0_base = S0 + i_b.to(tl.int64) * stride_s0b + i_h.to(tl.int64) * stride_s0h
        z0_base = Z0 + i_b.to(tl.int64) * stride_z0b + i_h.to(tl.int64) * stride_z0h
        b_s = tl.load(s0_base + offs_f[:, None] * stride_s0f + offs_d[None, :] * stride_s0d, mask=m_fd, other=0.0)
        b_z = tl.load(z0_base + offs_f * stride_z0f, mask=m_f, other=0.0)

    # pointers advance by one token per step: 64-bit, and no token index to widen
    p_k0 = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh + offs_f * stride_kf    # [BF]
    p_v0 = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh + offs_d * stride_vd    # [BV]
    if not CAUSAL:
        p_k = p_k0
        p_v = p_v0
        for _ in range(0, seq):
            b_kf = load_features(p_k, m_f, 1.0, FMAP)                                    # [BF]
            b_v = tl.load(p_v, mask=m_d, other=0.0).to(tl.float32)                       # [BV]
            b_s += b_kf[:, None] * b_v[None, :]
            b_z += b_kf
            p_k += stride_kt
            p_v += stride_vt

    p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh + offs_f * stride_qf      # [BF]
    p_o = OUT + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh + offs_d * stride_od    # [BV]
    p_g = G + i_b.to(tl.int64) * stride_gb + i_h.to(tl.int64) * stride_gh
    p_k = p_k0
    p_v = p_v0
    for _ in range(0, seq):
        if CAUSAL:
            b_kf = load_features(p_k, m_f, 1.0, FMAP)
            b_v = tl.load(p_v, mask=m_d, other=0.0).to(tl.float32)
            if HAS_DECAY:
                b_a = tl.exp(tl.load(p_g).to(tl.float32))
                b_s = b_s * b_a
                b_z = b_z * b_a
                p_g += stride_gt
            b_s += b_kf[:, None] * b_v[None, :]
            b_z += b_kf
            p_k += stride_kt
            p_v += stride_vt
        b_qf = load_features(p_q, m_f, scale, FMAP)                                      # [BF]
        b_o = tl.sum(b_qf[:, None] * b_s, 0)                                             # [BV]
        if NORMALIZE:
            b_o = b_o / (tl.sum(b_qf * b_z, 0) + eps)
        tl.store(p_o, b_o.to(OUT.dtype.element_ty), mask=m_d)
        p_q += stride_qt
        p_o += stride_ot

    tl.store(S_OUT + i_bh.to(tl.int64) * (F * DV) + offs_f[:, None] * DV + offs_d[None, :], b_s, mask=m_fd)
    tl.store(Z_OUT + i_bh.to(tl.int64) * F + offs_f, b_z, mask=m_f & ((offs_f * 0 + i_v) == 0))
