"""Chunked linear attention forward output (the intra-chunk part as masked matmuls).

For token i of chunk c, with ``S_c`` / ``z_c`` the state before the chunk (``chunk_state``; the
one total state when non-causal) and ``w_ij = exp(b_i - b_j)`` for ``j <= i`` (``_common``)::

    A      = (qf kf^T) * w                                         [BT, BT] (causal only)
    num_i  = exp(b_i) qf_i S_c + sum_j A_ij v_j
    den_i  = exp(b_i) qf_i . z_c + sum_j A_ij
    out_i  = num_i / (den_i + eps)                                 (num_i without normalize)

The state products take float32 operands (TF32 on a GPU for half inputs: a long sequence's state
can pass the float16 range); the intra-chunk products take the inputs' dtype; all accumulate in
float32. The denominator needs every feature, so each value-block program sums it itself.
"""
import triton
import triton.language as tl

from ._common import causal_weights, chunk_decay, load_features, to_dot


@triton.jit(do_not_specialize=["heads", "group", "seq"])
def chunk_output_kernel(
        Q, K, V, G, H, HZ, OUT,
        stride_qb, stride_qh, stride_qt, stride_qf,
        stride_kb, stride_kh, stride_kt, stride_kf,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_gb, stride_gh, stride_gt,
        stride_ob, stride_oh, stride_ot, stride_od,
        stride_hbh, stride_hc, stride_hzbh, stride_hzc,
        heads, group, seq, scale, eps,
        F: tl.constexpr, DV: tl.constexpr, FMAP: tl.constexpr, CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr,
        NORMALIZE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """``out_i = (exp(b_i) qf_i S_c + sum_j A_ij v_j) / (exp(b_i) qf_i . z_c + sum_j A_ij + eps)``,
    ``A = (qf kf^T) * w`` (module docstring). Grid ``(cdiv(DV, BV), cdiv(S, BT), B * Hq)``.

    q (B, Hq, S, F), k (B, Hkv, S, F), v (B, Hkv, S, DV), g (B, Hq, S), out (B, Hq, S, DV), any
    strides. ``H`` / ``HZ``: float32 states, chunk c of program row ``bh`` at ``bh * stride_hbh +
    c * stride_hc`` (F, DV) row-major (``stride_hc = 0``: one state for every chunk)."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // heads, i_bh % heads
    i_hk = i_h // group
    offs_c = tl.arange(0, BT)                                                            # [BT]
    offs_t = i_c * BT + offs_c                                                           # [BT]
    offs_d = i_v * BV + tl.arange(0, BV)                                                 # [BV]
    m_t = offs_t < seq
    m_d = offs_d < DV
    offs_t64 = offs_t.to(tl.int64)

    q_base = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    k_base = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    v_base = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    g_base = G + i_b.to(tl.int64) * stride_gb + i_h.to(tl.int64) * stride_gh
    h_base = H + i_bh.to(tl.int64) * stride_hbh + i_c.to(tl.int64) * stride_hc
    hz_base = HZ + i_bh.to(tl.int64) * stride_hzbh + i_c.to(tl.int64) * stride_hzc

    b_o = tl.zeros([BT, BV], dtype=tl.float32)                                          # [BT, BV]
    b_den = tl.zeros([BT], dtype=tl.float32)                                             # [BT]
    b_a = tl.zeros([BT, BT], dtype=tl.float32)                                          # [BT, BT]
    for i_k in range(0, tl.cdiv(F, BK)):
        offs_f = i_k * BK + tl.arange(0, BK)                                             # [BK]
        m_f = offs_f < F
        b_qf = load_features(q_base + offs_t64[:, None] * stride_qt + offs_f[None, :] * stride_qf,
                             m_t[:, None] & m_f[None, :], scale, FMAP)                   # [BT, BK]
        b_h = tl.load(h_base + offs_f[:, None] * DV + offs_d[None, :], mask=m_f[:, None] & m_d[None, :],
                      other=0.0)                                                         # [BK, BV]
        b_o += tl.dot(b_qf, b_h, input_precision=PRECISION)
        if NORMALIZE:
            b_hz = tl.load(hz_base + offs_f, mask=m_f, other=0.0)                        # [BK]
            b_den += tl.sum(b_qf * b_hz[None, :], 1)
        if CAUSAL:
            b_kf = load_features(k_base + offs_f[:, None] * stride_kf + offs_t64[None, :] * stride_kt,
                                 m_f[:, None] & m_t[None, :], 1.0, FMAP)                 # [BK, BT] kf^T
            b_a += tl.dot(to_dot(b_qf, Q, DOT_FP32), to_dot(b_kf, Q, DOT_FP32), input_precision=PRECISION)

    b_b, b_last = chunk_decay(g_base, offs_t, m_t, stride_gt, HAS_DECAY)
    if HAS_DECAY:
        b_e = tl.exp(b_b)                                                                # [BT]
        b_o = b_o * b_e[:, None]
        b_den = b_den * b_e
    if CAUSAL:
        b_a = b_a * causal_weights(b_b, offs_c, HAS_DECAY)
        b_v = tl.load(v_base + offs_t64[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                      mask=m_t[:, None] & m_d[None, :], other=0.0)                       # [BT, BV]
        b_o += tl.dot(to_dot(b_a, Q, DOT_FP32), to_dot(b_v, Q, DOT_FP32), input_precision=PRECISION)
        b_den += tl.sum(b_a, 1)
    if NORMALIZE:
        b_o = b_o / (b_den + eps)[:, None]
    o_base = OUT + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_t64[:, None] * stride_ot + offs_d[None, :] * stride_od, b_o.to(OUT.dtype.element_ty),
             mask=m_t[:, None] & m_d[None, :])
