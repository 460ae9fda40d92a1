"""Chunked linear attention backward, one chunk per program (states from ``chunk_state``).

Normalizing, ``out_i = num_i r_i`` with ``r_i = 1 / (den_i + eps)``; the normalizer is linear
attention with the value 1, so the gradients are those of the unnormalized output for
``do_i = dout_i r_i`` plus those of the value-1 column with ``dden_i = -r_i (dout_i . out_i)``
(``chunk_norm_grad_kernel`` recomputes ``den`` to get them). Without normalize ``do = dout``,
``dden = 0``. With ``S_c``, ``z_c`` the state before chunk c, ``dS_{c+1}``, ``dz_{c+1}`` the
gradient of the state after it, ``w_ij = exp(b_i - b_j)`` (j <= i) and
``dA_ij = (do_i . v_j + dden_i) w_ij`` (causal only)::

    dqf_i = exp(b_i) (do_i S_c^T + dden_i z_c) + sum_j dA_ij kf_j
    dkf_j = exp(b_last - b_j) (v_j dS_{c+1}^T + dz_{c+1}) + sum_i dA_ij qf_i
    dv_j  = exp(b_last - b_j) kf_j dS_{c+1} + sum_i A_ij do_i

then ``dq = dqf scale f'(q)``, ``dk = dkf f'(k)``. Log decay: everything depends on it through
``qf_t e^{B_t}``, ``kf_t e^{-B_t}`` and ``S_T = e^{B_T} (...)`` with ``B`` its running sum, so
``dB_t = dqf_t . qf_t - dkf_t . kf_t`` (plus ``<dS_T, S_T> + <dz_T, z_T>`` at the last token) and
``dg_t = sum_{t' >= t} dB_t'`` (the launcher sums the feature blocks and takes that reverse sum).

GQA: programs run per query head; the launcher sums dk, dv over each group.
"""
import triton
import triton.language as tl

from ._common import causal_weights, chunk_decay, feature_map, feature_map_grad, load_features, to_dot


@triton.jit(do_not_specialize=["heads", "group", "seq"])
def chunk_norm_grad_kernel(
        Q, K, G, HZ, OUT, DOUT, R, DDEN,
        stride_qb, stride_qh, stride_qt, stride_qf,
        stride_kb, stride_kh, stride_kt, stride_kf,
        stride_gb, stride_gh, stride_gt,
        stride_ob, stride_oh, stride_ot, stride_od,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_hzbh, stride_hzc,
        heads, group, seq, scale, eps,
        F: tl.constexpr, DV: tl.constexpr, FMAP: tl.constexpr, CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Grid ``(cdiv(S, BT), B * Hq)``. Writes ``R[bh, t] = 1 / (den_t + eps)`` and
    ``DDEN[bh, t] = -R (dout_t . out_t)`` ((B*Hq, S) float32), ``den`` as in ``chunk_output``."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // heads, i_bh % heads
    i_hk = i_h // group
    offs_c = tl.arange(0, BT)                                                            # [BT]
    offs_t = i_c * BT + offs_c
    m_t = offs_t < seq
    offs_t64 = offs_t.to(tl.int64)
    q_base = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    k_base = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    g_base = G + i_b.to(tl.int64) * stride_gb + i_h.to(tl.int64) * stride_gh
    hz_base = HZ + i_bh.to(tl.int64) * stride_hzbh + i_c.to(tl.int64) * stride_hzc

    b_den = tl.zeros([BT], dtype=tl.float32)                                             # [BT]
    b_a = tl.zeros([BT, BT], dtype=tl.float32)                                          # [BT, BT]
    for i_k in range(0, tl.cdiv(F, BK)):
        offs_f = i_k * BK + tl.arange(0, BK)
        m_f = offs_f < F
        b_qf = load_features(q_base + offs_t64[:, None] * stride_qt + offs_f[None, :] * stride_qf,
                             m_t[:, None] & m_f[None, :], scale, FMAP)                   # [BT, BK]
        b_den += tl.sum(b_qf * tl.load(hz_base + offs_f, mask=m_f, other=0.0)[None, :], 1)
        if CAUSAL:
            b_kf = load_features(k_base + offs_f[:, None] * stride_kf + offs_t64[None, :] * stride_kt,
                                 m_f[:, None] & m_t[None, :], 1.0, FMAP)                 # [BK, BT]
            b_a += tl.dot(to_dot(b_qf, Q, DOT_FP32), to_dot(b_kf, Q, DOT_FP32), input_precision=PRECISION)
    b_b, b_last = chunk_decay(g_base, offs_t, m_t, stride_gt, HAS_DECAY)
    if HAS_DECAY:
        b_den = b_den * tl.exp(b_b)
    if CAUSAL:
        b_den += tl.sum(b_a * causal_weights(b_b, offs_c, HAS_DECAY), 1)
    b_r = 1.0 / (b_den + eps)

    o_base = OUT + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    do_base = DOUT + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
    b_dot = tl.zeros([BT], dtype=tl.float32)                                             # [BT]
    for i_v in range(0, tl.cdiv(DV, BV)):
        offs_d = i_v * BV + tl.arange(0, BV)
        m_td = m_t[:, None] & (offs_d < DV)[None, :]
        b_out = tl.load(o_base + offs_t64[:, None] * stride_ot + offs_d[None, :] * stride_od, mask=m_td, other=0.0)
        b_do = tl.load(do_base + offs_t64[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=m_td, other=0.0)
        b_dot += tl.sum(b_out.to(tl.float32) * b_do.to(tl.float32), 1)
    tl.store(R + i_bh.to(tl.int64) * seq + offs_t64, b_r, mask=m_t)
    tl.store(DDEN + i_bh.to(tl.int64) * seq + offs_t64, -b_dot * b_r, mask=m_t)


@triton.jit(do_not_specialize=["heads", "group", "seq"])
def chunk_dv_kernel(
        Q, K, G, DOUT, R, DH, DVAL,
        stride_qb, stride_qh, stride_qt, stride_qf,
        stride_kb, stride_kh, stride_kt, stride_kf,
        stride_gb, stride_gh, stride_gt,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dvb, stride_dvh, stride_dvt, stride_dvd,
        stride_dhbh, stride_dhc,
        heads, group, seq, scale,
        F: tl.constexpr, DV: tl.constexpr, FMAP: tl.constexpr, CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr,
        NORMALIZE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """``dv_j = exp(b_last - b_j) kf_j dS_{c+1} + sum_{i >= j} A_ij do_i``.

    Grid ``(cdiv(DV, BV), cdiv(S, BT), B * Hq)``: ``dv`` of query head h's share, written to
    ``DVAL`` indexed (b, h) (v's own gradient when there is no GQA, else a per-query-head buffer)."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // heads, i_bh % heads
    i_hk = i_h // group
    offs_c = tl.arange(0, BT)                                                            # [BT]
    offs_t = i_c * BT + offs_c
    offs_d = i_v * BV + tl.arange(0, BV)                                                 # [BV]
    m_t = offs_t < seq
    m_d = offs_d < DV
    offs_t64 = offs_t.to(tl.int64)
    q_base = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    k_base = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    g_base = G + i_b.to(tl.int64) * stride_gb + i_h.to(tl.int64) * stride_gh
    dh_base = DH + i_bh.to(tl.int64) * stride_dhbh + i_c.to(tl.int64) * stride_dhc

    b_dv = tl.zeros([BT, BV], dtype=tl.float32)                                         # [BT, BV]
    b_at = tl.zeros([BT, BT], dtype=tl.float32)                                         # [BT, BT] A^T (j, i)
    for i_k in range(0, tl.cdiv(F, BK)):
        offs_f = i_k * BK + tl.arange(0, BK)
        m_f = offs_f < F
        b_kf = load_features(k_base + offs_t64[:, None] * stride_kt + offs_f[None, :] * stride_kf,
                             m_t[:, None] & m_f[None, :], 1.0, FMAP)                     # [BT, BK]
        b_dh = tl.load(dh_base + offs_f[:, None] * DV + offs_d[None, :], mask=m_f[:, None] & m_d[None, :],
                       other=0.0)                                                        # [BK, BV]
        b_dv += tl.dot(b_kf, b_dh, input_precision=PRECISION)
        if CAUSAL:
            b_qf = load_features(q_base + offs_f[:, None] * stride_qf + offs_t64[None, :] * stride_qt,
                                 m_f[:, None] & m_t[None, :], scale, FMAP)               # [BK, BT] qf^T
            b_at += tl.dot(to_dot(b_kf, Q, DOT_FP32), to_dot(b_qf, Q, DOT_FP32), input_precision=PRECISION)
    b_b, b_last = chunk_decay(g_base, offs_t, m_t, stride_gt, HAS_DECAY)
    if HAS_DECAY:
        b_dv = b_dv * tl.exp(b_last - b_b)[:, None]
    if CAUSAL:
        b_at = b_at * tl.trans(causal_weights(b_b, offs_c, HAS_DECAY))
        do_base = DOUT + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
        b_do = tl.load(do_base + offs_t64[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                       mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)       # [BT, BV]
        if NORMALIZE:
            b_do = b_do * tl.load(R + i_bh.to(tl.int64) * seq + offs_t64, mask=m_t, other=0.0)[:, None]
        b_dv += tl.dot(to_dot(b_at, Q, DOT_FP32), to_dot(b_do, Q, DOT_FP32), input_precision=PRECISION)
    dv_base = DVAL + i_b.to(tl.int64) * stride_dvb + i_h.to(tl.int64) * stride_dvh
    tl.store(dv_base + offs_t64[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             b_dv.to(DVAL.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@triton.jit(do_not_specialize=["heads", "group", "seq"])
def chunk_dqk_kernel(
        Q, K, V, G, DOUT, R, DDEN, H, HZ, DH, DHZ, DQ, DKEY, DG,
        stride_qb, stride_qh, stride_qt, stride_qf,
        stride_kb, stride_kh, stride_kt, stride_kf,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_gb, stride_gh, stride_gt,
        stride_dob, stride_doh, stride_dot, stride_dod,
        stride_dqb, stride_dqh, stride_dqt, stride_dqf,
        stride_dkb, stride_dkh, stride_dkt, stride_dkf,
        stride_hbh, stride_hc, stride_hzbh, stride_hzc,
        stride_dhbh, stride_dhc, stride_dhzbh, stride_dhzc,
        stride_dgk, heads, group, seq, scale,
        F: tl.constexpr, DV: tl.constexpr, FMAP: tl.constexpr, CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr,
        NORMALIZE: tl.constexpr, STORE_DG: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """``dqf_i = exp(b_i) (do_i S_c^T + dden_i z_c) + sum_j dA_ij kf_j``,
    ``dkf_j = exp(b_last - b_j) (v_j dS_{c+1}^T + dz_{c+1}) + sum_i dA_ij qf_i``, then
    ``dq = dqf scale f'(q)``, ``dk = dkf f'(k)``, ``dB_t = dqf_t . qf_t - dkf_t . kf_t``.

    Grid ``(cdiv(F, BK), cdiv(S, BT), B * Hq)``: ``dq``, query head h's share of ``dk`` (``DKEY``
    indexed (b, h), as ``DVAL`` in `chunk_dv_kernel`) and, STORE_DG, this feature block's part of
    ``dB_t`` at ``DG[i_k * stride_dgk + bh * S + t]`` (float32)."""
    i_k, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // heads, i_bh % heads
    i_hk = i_h // group
    offs_c = tl.arange(0, BT)                                                            # [BT]
    offs_t = i_c * BT + offs_c
    offs_f = i_k * BK + tl.arange(0, BK)                                                 # [BK]
    m_t = offs_t < seq
    m_f = offs_f < F
    m_tf = m_t[:, None] & m_f[None, :]
    offs_t64 = offs_t.to(tl.int64)
    q_base = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    k_base = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    v_base = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    g_base = G + i_b.to(tl.int64) * stride_gb + i_h.to(tl.int64) * stride_gh
    do_base = DOUT + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
    h_base = H + i_bh.to(tl.int64) * stride_hbh + i_c.to(tl.int64) * stride_hc
    dh_base = DH + i_bh.to(tl.int64) * stride_dhbh + i_c.to(tl.int64) * stride_dhc
    b_r = tl.zeros([BT], dtype=tl.float32)
    if NORMALIZE:
        b_r = tl.load(R + i_bh.to(tl.int64) * seq + offs_t64, mask=m_t, other=0.0)      # [BT]

    b_dqf = tl.zeros([BT, BK], dtype=tl.float32)                                        # [BT, BK]
    b_dkf = tl.zeros([BT, BK], dtype=tl.float32)                                        # [BT, BK]
    b_da = tl.zeros([BT, BT], dtype=tl.float32)                                         # [BT, BT] (i, j)
    for i_v in range(0, tl.cdiv(DV, BV)):
        offs_d = i_v * BV + tl.arange(0, BV)                                             # [BV]
        m_d = offs_d < DV
        m_td = m_t[:, None] & m_d[None, :]
        m_df = m_d[:, None] & m_f[None, :]
        b_do = tl.load(do_base + offs_t64[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=m_td,
                       other=0.0).to(tl.float32)                                         # [BT, BV]
        if NORMALIZE:
            b_do = b_do * b_r[:, None]
        b_v = tl.load(v_base + offs_t64[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=m_td,
                      other=0.0)                                                         # [BT, BV]
        b_ht = tl.load(h_base + offs_f[None, :] * DV + offs_d[:, None], mask=m_df, other=0.0)     # [BV, BK] S_c^T
        b_dht = tl.load(dh_base + offs_f[None, :] * DV + offs_d[:, None], mask=m_df, other=0.0)   # [BV, BK]
        b_dqf += tl.dot(b_do, b_ht, input_precision=PRECISION)
        b_dkf += tl.dot(b_v.to(tl.float32), b_dht, input_precision=PRECISION)
        if CAUSAL:
            b_da += tl.dot(to_dot(b_do, Q, DOT_FP32), to_dot(tl.trans(b_v), Q, DOT_FP32), input_precision=PRECISION)

    b_dkf += tl.load(DHZ + i_bh.to(tl.int64) * stride_dhzbh + i_c.to(tl.int64) * stride_dhzc + offs_f,
                     mask=m_f, other=0.0)[None, :]
    if NORMALIZE:
        b_dden = tl.load(DDEN + i_bh.to(tl.int64) * seq + offs_t64, mask=m_t, other=0.0)  # [BT]
        b_hz = tl.load(HZ + i_bh.to(tl.int64) * stride_hzbh + i_c.to(tl.int64) * stride_hzc + offs_f,
                       mask=m_f, other=0.0)                                              # [BK]
        b_dqf += b_dden[:, None] * b_hz[None, :]
        if CAUSAL:
            b_da += b_dden[:, None]
    b_b, b_last = chunk_decay(g_base, offs_t, m_t, stride_gt, HAS_DECAY)
    if HAS_DECAY:
        b_dqf = b_dqf * tl.exp(b_b)[:, None]
        b_dkf = b_dkf * tl.exp(b_last - b_b)[:, None]

    b_q = tl.load(q_base + offs_t64[:, None] * stride_qt + offs_f[None, :] * stride_qf, mask=m_tf, other=0.0)
    b_k = tl.load(k_base + offs_t64[:, None] * stride_kt + offs_f[None, :] * stride_kf, mask=m_tf, other=0.0)
    b_qf = tl.where(m_tf, feature_map(b_q, FMAP) * scale, 0.0)                         # [BT, BK]
    b_kf = tl.where(m_tf, feature_map(b_k, FMAP), 0.0)                                  # [BT, BK]
    if CAUSAL:
        b_da = b_da * causal_weights(b_b, offs_c, HAS_DECAY)
        b_dqf += tl.dot(to_dot(b_da, Q, DOT_FP32), to_dot(b_kf, Q, DOT_FP32), input_precision=PRECISION)
        b_dkf += tl.dot(to_dot(tl.trans(b_da), Q, DOT_FP32), to_dot(b_qf, Q, DOT_FP32), input_precision=PRECISION)
    if STORE_DG:
        b_dg = tl.sum(b_dqf * b_qf, 1) - tl.sum(b_dkf * b_kf, 1)                        # [BT]
        tl.store(DG + i_k.to(tl.int64) * stride_dgk + i_bh.to(tl.int64) * seq + offs_t64, b_dg, mask=m_t)

    b_dq = b_dqf * scale * feature_map_grad(b_q, FMAP)
    b_dk = b_dkf * feature_map_grad(b_k, FMAP)
    dq_base = DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
    dk_base = DKEY + i_b.to(tl.int64) * stride_dkb + i_h.to(tl.int64) * stride_dkh
    tl.store(dq_base + offs_t64[:, None] * stride_dqt + offs_f[None, :] * stride_dqf, b_dq.to(DQ.dtype.element_ty),
             mask=m_tf)
    tl.store(dk_base + offs_t64[:, None] * stride_dkt + offs_f[None, :] * stride_dkf,
             b_dk.to(DKEY.dtype.element_ty), mask=m_tf)
