"""The state passed across chunks of BT tokens (chunked linear attention, forward and backward).

Forward: with ``b`` the in-chunk cumulative log decay (``_common``) and ``S_c`` the state before
chunk c (``S_0`` the initial state)::

    S_{c+1} = exp(b_last) S_c + sum_{j in c} exp(b_last - b_j) kf_j^T v_j        (z: v_j -> 1)

Backward: with ``do_i`` the gradient of token i's numerator (``dout_i / (den_i + eps)`` when
normalizing) and ``dden_i`` that of its denominator, the gradient of ``S_c`` is::

    dS_c = exp(b_last) dS_{c+1} + sum_{i in c} exp(b_i) qf_i^T do_i              (z: do_i -> dden_i)

from ``dS_{last}`` = the gradient of the returned final state; ``dS_0`` is the initial state's.
Non-causal attention has one state, ``S_0 + sum_t kf_t^T v_t``, read by every token: both scans
then just sum (no decay is allowed there) and store their total once.

The scans are sequential in c, parallel over (feature block, value block, batch * head); the
state stays in float32 registers. GQA: query head h reads kv head ``h // group``; the state,
decay and gradients are per query head.
"""
import triton
import triton.language as tl

from ._common import chunk_decay, load_features, to_dot


@triton.jit(do_not_specialize=["heads", "group", "seq", "num_chunks"])
def chunk_state_forward_kernel(
        K, V, G, S0, Z0, H, HZ, S_OUT, Z_OUT,
        stride_kb, stride_kh, stride_kt, stride_kf,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_gb, stride_gh, stride_gt,
        stride_s0b, stride_s0h, stride_s0f, stride_s0d,
        stride_z0b, stride_z0h, stride_z0f,
        heads, group, seq, num_chunks,
        F: tl.constexpr, DV: tl.constexpr, FMAP: tl.constexpr, CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr,
        HAS_INITIAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """``S_{c+1} = exp(b_last) S_c + sum_j exp(b_last - b_j) kf_j^T v_j`` (z: ``v_j -> 1``), from
    ``S_0`` = the initial state (zeros without one). Grid ``(cdiv(F, BK), cdiv(DV, BV), B * Hq)``.

    k (B, Hkv, S, F), v (B, Hkv, S, DV), g (B, Hq, S) log decay (any strides, 0 included),
    S0 (B, Hq, F, DV) / Z0 (B, Hq, F) the initial state (HAS_INITIAL). Writes, contiguous float32:
    causal ``H`` (B*Hq, num_chunks, F, DV) / ``HZ`` (B*Hq, num_chunks, F) the state before each
    chunk, and always ``S_OUT`` (B*Hq, F, DV) / ``Z_OUT`` (B*Hq, F) the final state."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // heads, i_bh % heads
    i_hk = i_h // group
    offs_f = i_k * BK + tl.arange(0, BK)                                                 # [BK]
    offs_d = i_v * BV + tl.arange(0, BV)                                                 # [BV]
    offs_c = tl.arange(0, BT)                                                            # [BT]
    m_f = offs_f < F
    m_d = offs_d < DV
    m_fd = m_f[:, None] & m_d[None, :]
    # z does not depend on the value block: one program writes it (a scalar & a block breaks the interpreter)
    m_z = m_f & ((offs_f * 0 + i_v) == 0)

    # 64-bit batch/head offsets: B * H * S * D overflows int32 at real sizes.
    k_base = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    v_base = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    g_base = G + i_b.to(tl.int64) * stride_gb + i_h.to(tl.int64) * stride_gh

    b_s = tl.zeros([BK, BV], dtype=tl.float32)                                          # [BK, BV]
    b_z = tl.zeros([BK], dtype=tl.float32)                                               # [BK]
    if HAS_INITIAL:
        s0_base = S0 + i_b.to(tl.int64) * stride_s0b + i_h.to(tl.int64) * stride_s0h
        z0_base = Z0 + i_b.to(tl.int64) * stride_z0b + i_h.to(tl.int64) * stride_z0h
        b_s = tl.load(s0_base + offs_f[:, None] * stride_s0f + offs_d[None, :] * stride_s0d, mask=m_fd, other=0.0)
        b_z = tl.load(z0_base + offs_f * stride_z0f, mask=m_f, other=0.0)
    p_h = H + i_bh.to(tl.int64) * num_chunks * (F * DV) + offs_f[:, None] * DV + offs_d[None, :]   # [BK, BV]
    p_hz = HZ + i_bh.to(tl.int64) * num_chunks * F + offs_f                                         # [BK]

    for i_c in range(0, num_chunks):
        if CAUSAL:
            tl.store(p_h, b_s, mask=m_fd)
            tl.store(p_hz, b_z, mask=m_z)
            p_h += F * DV
            p_hz += F
        offs_t = i_c * BT + offs_c                                                       # [BT]
        m_t = offs_t < seq
        offs_t64 = offs_t.to(tl.int64)
        b_kf = load_features(k_base + offs_f[:, None] * stride_kf + offs_t64[None, :] * stride_kt,
                             m_f[:, None] & m_t[None, :], 1.0, FMAP)                    # [BK, BT] kf^T
        b_v = tl.load(v_base + offs_t64[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                      mask=m_t[:, None] & m_d[None, :], other=0.0)                       # [BT, BV]
        if HAS_DECAY:
            b_b, b_last = chunk_decay(g_base, offs_t, m_t, stride_gt, HAS_DECAY)
            b_kf = b_kf * tl.exp(b_last - b_b)[None, :]
            b_s = b_s * tl.exp(b_last)
            b_z = b_z * tl.exp(b_last)
        b_s += tl.dot(to_dot(b_kf, K, DOT_FP32), to_dot(b_v, K, DOT_FP32), input_precision=PRECISION)
        b_z += tl.sum(b_kf, 1)

    tl.store(S_OUT + i_bh.to(tl.int64) * (F * DV) + offs_f[:, None] * DV + offs_d[None, :], b_s, mask=m_fd)
    tl.store(Z_OUT + i_bh.to(tl.int64) * F + offs_f, b_z, mask=m_z)


@triton.jit(do_not_specialize=["heads", "seq", "num_chunks"])
def chunk_state_backward_kernel(
        Q, G, DOUT, R, DDEN, DS_FINAL, DZ_FINAL, DH, DHZ, DS0, DZ0,
        stride_qb, stride_qh, stride_qt, stride_qf,
        stride_gb, stride_gh, stride_gt,
        stride_ob, stride_oh, stride_ot, stride_od,
        stride_dsb, stride_dsh, stride_dsf, stride_dsd,
        stride_dzb, stride_dzh, stride_dzf,
        heads, seq, num_chunks, scale,
        F: tl.constexpr, DV: tl.constexpr, FMAP: tl.constexpr, CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr,
        NORMALIZE: tl.constexpr, HAS_DFINAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """``dS_c = exp(b_last) dS_{c+1} + sum_i exp(b_i) qf_i^T do_i`` (z: ``do_i -> dden_i``), from
    the final state's gradient. Grid ``(cdiv(F, BK), cdiv(DV, BV), B * Hq)``.

    q (B, Hq, S, F), dout (B, Hq, S, DV), ``R`` / ``DDEN`` (B*Hq, S) float32 ``1 / (den + eps)`` and
    the denominator's gradient (NORMALIZE), ``DS_FINAL`` (B, Hq, F, DV) / ``DZ_FINAL`` (B, Hq, F) the
    gradient of the final state (HAS_DFINAL). Writes, contiguous float32: ``DH`` (B*Hq, num_chunks,
    F, DV) / ``DHZ`` (B*Hq, num_chunks, F) the gradient of the state after each chunk (non-causal:
    one total, chunk count 1), ``DS0`` (B*Hq, F, DV) / ``DZ0`` (B*Hq, F) the initial state's."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // heads, i_bh % heads
    offs_f = i_k * BK + tl.arange(0, BK)                                                 # [BK]
    offs_d = i_v * BV + tl.arange(0, BV)                                                 # [BV]
    offs_c = tl.arange(0, BT)                                                            # [BT]
    m_f = offs_f < F
    m_d = offs_d < DV
    m_fd = m_f[:, None] & m_d[None, :]
    m_z = m_f & ((offs_f * 0 + i_v) == 0)

    q_base = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    g_base = G + i_b.to(tl.int64) * stride_gb + i_h.to(tl.int64) * stride_gh
    o_base = DOUT + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    r_base = R + i_bh.to(tl.int64) * seq
    dd_base = DDEN + i_bh.to(tl.int64) * seq

    b_ds = tl.zeros([BK, BV], dtype=tl.float32)                                         # [BK, BV]
    b_dz = tl.zeros([BK], dtype=tl.float32)                                              # [BK]
    if HAS_DFINAL:
        ds_base = DS_FINAL + i_b.to(tl.int64) * stride_dsb + i_h.to(tl.int64) * stride_dsh
        dz_base = DZ_FINAL + i_b.to(tl.int64) * stride_dzb + i_h.to(tl.int64) * stride_dzh
        b_ds = tl.load(ds_base + offs_f[:, None] * stride_dsf + offs_d[None, :] * stride_dsd, mask=m_fd, other=0.0)
        b_dz = tl.load(dz_base + offs_f * stride_dzf, mask=m_f, other=0.0)
    # causal: walks the chunks backwards, from the last one's slot; non-causal: one slot
    slot = i_bh.to(tl.int64)
    if CAUSAL:
        slot = slot * num_chunks + num_chunks - 1
    p_dh = DH + slot * (F * DV) + offs_f[:, None] * DV + offs_d[None, :]                 # [BK, BV]
    p_dhz = DHZ + slot * F + offs_f                                                      # [BK]

    for i_r in range(0, num_chunks):
        if CAUSAL:
            tl.store(p_dh, b_ds, mask=m_fd)
            tl.store(p_dhz, b_dz, mask=m_z)
            p_dh -= F * DV
            p_dhz -= F
        offs_t = (num_chunks - 1 - i_r) * BT + offs_c                                   # [BT]
        m_t = offs_t < seq
        offs_t64 = offs_t.to(tl.int64)
        b_qf = load_features(q_base + offs_f[:, None] * stride_qf + offs_t64[None, :] * stride_qt,
                             m_f[:, None] & m_t[None, :], scale, FMAP)                 # [BK, BT] qf^T
        b_do = tl.load(o_base + offs_t64[:, None] * stride_ot + offs_d[None, :] * stride_od,
                       mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)       # [BT, BV]
        if NORMALIZE:
            b_do = b_do * tl.load(r_base + offs_t64, mask=m_t, other=0.0)[:, None]
        if HAS_DECAY:
            b_b, b_last = chunk_decay(g_base, offs_t, m_t, stride_gt, HAS_DECAY)
            b_qf = b_qf * tl.exp(b_b)[None, :]
            b_ds = b_ds * tl.exp(b_last)
            b_dz = b_dz * tl.exp(b_last)
        b_ds += tl.dot(to_dot(b_qf, Q, DOT_FP32), to_dot(b_do, Q, DOT_FP32), input_precision=PRECISION)
        if NORMALIZE:
            b_dz += tl.sum(b_qf * tl.load(dd_base + offs_t64, mask=m_t, other=0.0)[None, :], 1)

    if not CAUSAL:
        tl.store(p_dh, b_ds, mask=m_fd)
        tl.store(p_dhz, b_dz, mask=m_z)
    tl.store(DS0 + i_bh.to(tl.int64) * (F * DV) + offs_f[:, None] * DV + offs_d[None, :], b_ds, mask=m_fd)
    tl.store(DZ0 + i_bh.to(tl.int64) * F + offs_f, b_dz, mask=m_z)
