"""Fused softmax attention backward, FlashAttention-2 style, dense and varlen.

With ``P = softmax(logits)`` (recomputed from q, k and the saved ``lse``), the dropout factor
``Z = keep / (1 - p)`` and ``x = scale * q k^T`` before softcap::

    dV     = (P * Z)^T dO
    dP     = (dO V^T) * Z
    delta  = rowsum(dO * O) - dlse              (the lse gradient enters here)
    dS     = P * (dP - delta)                   (gradient of the logits; = dBias)
    dX     = dS * (1 - tanh^2(x / softcap))     (1 without softcap)
    dQ     = scale * dX K,    dK = scale * dX^T Q

Three kernels: `attention_backward_preprocess_kernel` (delta), `attention_backward_dkdv_kernel`
(one program per key block of one kv head; it loops over the query heads of its GQA group
and the query blocks that see the key block, so dK/dV need no atomics) and
`attention_backward_dq_kernel` (one program per query block; also writes dS for a bias
gradient). Rows with ``lse = -inf`` saw no key: their P is 0 and every gradient is finite.
"""
import triton
import triton.language as tl

from ._common import (BIAS_BOOL, BIAS_FLOAT, BIAS_NONE, LOG2E, dropout_keep, kv_block_range, q_block_range,
                      tanh_exp2, window_mask)


@triton.jit(do_not_specialize=["seq_q"])
def attention_backward_preprocess_kernel(
        OUT, DOUT, DLSE, DELTA,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dlb, stride_dlh, stride_dlm,
        stride_deb, stride_deh, stride_dem,
        seq_q,
        DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """``delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] - dlse[b, h, i]``, in float32.

    Grid ``(cdiv(Sq, BLOCK_M), H, B)``; (B, H, Sq, DV) layouts through strides (varlen calls it
    on ``(1, H, total_q, DV)`` views)."""
    i_m, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)                                      # [BM]
    offs_dv = tl.arange(0, BLOCK_DV)                                                    # [BDV]
    m_m = offs_m < seq_q
    offs_m = offs_m.to(tl.int64)
    m_o = m_m[:, None] & (offs_dv < DV)[None, :]
    b, h = i_b.to(tl.int64), i_h.to(tl.int64)
    p_o = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    p_do = DOUT + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    b_o = tl.load(p_o, mask=m_o, other=0.0).to(tl.float32)                              # [BM, BDV]
    b_do = tl.load(p_do, mask=m_o, other=0.0).to(tl.float32)                            # [BM, BDV]
    b_dlse = tl.load(DLSE + b * stride_dlb + h * stride_dlh + offs_m * stride_dlm, mask=m_m, other=0.0)
    b_delta = tl.sum(b_o * b_do, 1) - b_dlse.to(tl.float32)                             # [BM]
    tl.store(DELTA + b * stride_deb + h * stride_deh + offs_m * stride_dem, b_delta, mask=m_m)


@triton.jit
def _probs(b_q, b_kt, p_bias, start_n, b_lse2, offs_m, i_n, len_q, len_k, stride_bias_n,
           qk_scale, cap_scale, cap_out, window_left, window_right,
           MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
           BIAS_KIND: tl.constexpr, PRECISION: tl.constexpr):
    """P [BM, BN] recomputed from the scores and ``lse2 = lse * log2(e)`` (+inf for rows that saw no
    key, so their P is 0), and tanh of the softcapped scores (0 without softcap)."""
    b_s = tl.dot(b_q, b_kt, input_precision=PRECISION)                                  # [BM, BN]
    b_t = b_s * 0.0
    if HAS_SOFTCAP:
        b_t = tanh_exp2(b_s, cap_scale)
        b_s = cap_out * b_t
    else:
        b_s = b_s * qk_scale
    if BIAS_KIND == BIAS_FLOAT:
        m_b = (offs_m < len_q)[:, None] & (i_n < len_k)[None, :]
        b_s += tl.load(p_bias + start_n * stride_bias_n, mask=m_b, other=0.0).to(tl.float32) * LOG2E
    elif BIAS_KIND == BIAS_BOOL:
        m_b = (offs_m < len_q)[:, None] & (i_n < len_k)[None, :]
        b_s = tl.where(tl.load(p_bias + start_n * stride_bias_n, mask=m_b, other=0) != 0, b_s, float("-inf"))
    if MASKED:
        m_vis = window_mask(offs_m, i_n, len_q, len_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        b_s = tl.where(m_vis, b_s, float("-inf"))
    b_p = tl.exp2(b_s - b_lse2[:, None])                                                # [BM, BN]
    return b_p, b_t


@triton.jit
def _dkdv_block(acc_dk, acc_dv, b_kt, b_vt, p_q, p_do, p_lse, p_delta, p_bias, start_m, offs_m0, i_n, offs_d,
                offs_dv, len_q, len_k, stride_qm, stride_dom, stride_lm, stride_bias_m, stride_bias_n, scale,
                qk_scale, cap_scale, cap_out, window_left, window_right,
                seed, drop_row0, drop_col0, drop_stride, drop_threshold, drop_scale,
                D: tl.constexpr, DV: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr,
                HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Query block ``[start_m, start_m + BM)`` of one query head into dK, dV of a key block."""
    offs_m = start_m + offs_m0                                                          # [BM]
    m_m = offs_m < len_q
    m_qd = (offs_d < D)[None, :]
    m_dod = (offs_dv < DV)[None, :]
    if MASKED:
        m_qd = m_qd & m_m[:, None]
        m_dod = m_dod & m_m[:, None]
    b_q = tl.load(p_q + start_m * stride_qm, mask=m_qd, other=0.0)                     # [BM, BD]
    b_do = tl.load(p_do + start_m * stride_dom, mask=m_dod, other=0.0)                 # [BM, BDV]
    if DOT_FP32:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    b_lse2 = tl.load(p_lse + start_m * stride_lm, mask=m_m, other=0.0) * LOG2E         # [BM]
    b_lse2 = tl.where(b_lse2 == float("-inf"), float("inf"), b_lse2)
    b_delta = tl.load(p_delta + start_m * stride_lm, mask=m_m, other=0.0)               # [BM]
    b_p, b_t = _probs(b_q, b_kt, p_bias + start_m * stride_bias_m, 0, b_lse2, offs_m, i_n, len_q, len_k,
                      stride_bias_n, qk_scale, cap_scale, cap_out, window_left, window_right,
                      MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, PRECISION)   # [BM, BN]
    b_dp = tl.dot(b_do, b_vt, input_precision=PRECISION)                               # [BM, BN]
    b_pz = b_p
    if HAS_DROPOUT:
        keep = dropout_keep(seed, drop_row0, drop_col0, drop_stride, offs_m, i_n, drop_threshold)
        b_pz = tl.where(keep, b_p * drop_scale, 0.0)
        b_dp = tl.where(keep, b_dp * drop_scale, 0.0)
    acc_dv += tl.dot(tl.trans(b_pz).to(b_do.dtype), b_do, input_precision=PRECISION)   # [BN, BDV]
    b_ds = b_p * (b_dp - b_delta[:, None])                                              # [BM, BN]
    if HAS_SOFTCAP:
        b_ds = b_ds * (scale * (1.0 - b_t * b_t))
    else:
        b_ds = b_ds * scale
    acc_dk += tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q, input_precision=PRECISION)     # [BN, BD]
    return acc_dk, acc_dv


@triton.jit(do_not_specialize=["num_heads", "group", "seq_q", "seq_k", "window_left", "window_right",
                               "drop_threshold", "tune_bucket"])
def attention_backward_dkdv_kernel(
        Q, K, V, BIAS, SEED, DOUT, LSE, DELTA, DK, DV_, CU_Q, CU_K,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_lb, stride_lh, stride_lm,
        stride_dkb, stride_dkh, stride_dkn, stride_dkd,
        stride_dvb, stride_dvh, stride_dvn, stride_dvd,
        num_heads, group, seq_q, seq_k,
        scale, qk_scale, cap_scale, cap_out, window_left, window_right, drop_threshold, drop_scale, tune_bucket,
        D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV. Grid ``(cdiv(max_seq_k, BLOCK_N), Hkv, B)``. Layouts and parameters as in
    `attention_forward_kernel`; ``DOUT`` has out's layout, ``LSE`` and ``DELTA`` share lse's
    layout (DELTA contiguous: its strides are lse's)."""
    tl.static_assert(BLOCK_D >= D and BLOCK_DV >= DV and BLOCK_DV <= 256 and BLOCK_D <= 256)
    i_n, i_hk, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if IS_VARLEN:
        bos_q = tl.load(CU_Q + i_b)
        len_q = tl.load(CU_Q + i_b + 1) - bos_q
        bos_k = tl.load(CU_K + i_b)
        len_k = tl.load(CU_K + i_b + 1) - bos_k
        drop_col0 = bos_k
    else:
        bos_q = i_n * 0
        len_q = seq_q
        bos_k = i_n * 0
        len_k = seq_k
        drop_col0 = i_n * 0
    n0 = i_n * BLOCK_N
    if n0 >= len_k:  # varlen: this sequence is shorter than max_seqlen_k
        return
    b64 = i_b.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)                                                 # [BN]
    offs_m0 = tl.arange(0, BLOCK_M)                                                     # [BM]
    offs_d = tl.arange(0, BLOCK_D)                                                      # [BD]
    offs_dv = tl.arange(0, BLOCK_DV)                                                    # [BDV]
    m_n = offs_n < len_k
    offs_n64 = offs_n.to(tl.int64)  # row offsets: Sk * stride may pass 2**31
    k_base = K + b64 * stride_kb + i_hk.to(tl.int64) * stride_kh + bos_k.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + i_hk.to(tl.int64) * stride_vh + bos_k.to(tl.int64) * stride_vn
    p_kt = k_base + offs_n64[None, :] * stride_kn + offs_d[:, None] * stride_kd         # [BD, BN]
    p_vt = v_base + offs_n64[None, :] * stride_vn + offs_dv[:, None] * stride_vd        # [BDV, BN]
    b_kt = tl.load(p_kt, mask=m_n[None, :] & (offs_d < D)[:, None], other=0.0)
    b_vt = tl.load(p_vt, mask=m_n[None, :] & (offs_dv < DV)[:, None], other=0.0)
    if DOT_FP32:
        b_kt = b_kt.to(tl.float32)
        b_vt = b_vt.to(tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    acc_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)                            # [BN, BD]
    acc_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)                           # [BN, BDV]
    lo, full_lo, full_hi, hi = q_block_range(n0, len_q, len_k, window_left, window_right,
                                             BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)

    # The query heads of this kv head's group, one after another: one program owns dK, dV.
    for i_g in range(0, group):
        i_h = i_hk * group + i_g
        h64 = i_h.to(tl.int64)
        if IS_VARLEN:
            drop_row0 = h64 * seq_q + bos_q
        else:
            drop_row0 = (b64 * num_heads + i_h) * seq_q
        q_base = Q + b64 * stride_qb + h64 * stride_qh + bos_q.to(tl.int64) * stride_qm
        do_base = DOUT + b64 * stride_dob + h64 * stride_doh + bos_q.to(tl.int64) * stride_dom
        l_off = b64 * stride_lb + h64 * stride_lh + bos_q.to(tl.int64) * stride_lm
        p_q = q_base + offs_m0[:, None] * stride_qm + offs_d[None, :] * stride_qd       # [BM, BD]
        p_do = do_base + offs_m0[:, None] * stride_dom + offs_dv[None, :] * stride_dod  # [BM, BDV]
        p_lse = LSE + l_off + offs_m0 * stride_lm                                       # [BM]
        p_delta = DELTA + l_off + offs_m0 * stride_lm                                   # [BM]
        p_bias = BIAS
        if BIAS_KIND != BIAS_NONE:
            p_bias = (BIAS + b64 * stride_bias_b + h64 * stride_bias_h
                      + offs_m0[:, None] * stride_bias_m + offs_n64[None, :] * stride_bias_n)  # [BM, BN]
        for start_m in range(lo, tl.minimum(full_lo, hi), BLOCK_M):
            acc_dk, acc_dv = _dkdv_block(
                acc_dk, acc_dv, b_kt, b_vt, p_q, p_do, p_lse, p_delta, p_bias, start_m, offs_m0, offs_n, offs_d,
                offs_dv, len_q, len_k, stride_qm, stride_dom, stride_lm, stride_bias_m, stride_bias_n, scale,
                qk_scale, cap_scale, cap_out, window_left, window_right,
                seed, drop_row0, drop_col0, seq_k, drop_threshold, drop_scale,
                D, DV, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_DROPOUT, DOT_FP32, PRECISION)
        for start_m in range(full_lo, full_hi, BLOCK_M):
            acc_dk, acc_dv = _dkdv_block(
                acc_dk, acc_dv, b_kt, b_vt, p_q, p_do, p_lse, p_delta, p_bias, start_m, offs_m0, offs_n, offs_d,
                offs_dv, len_q, len_k, stride_qm, stride_dom, stride_lm, stride_bias_m, stride_bias_n, scale,
                qk_scale, cap_scale, cap_out, window_left, window_right,
                seed, drop_row0, drop_col0, seq_k, drop_threshold, drop_scale,
                D, DV, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_DROPOUT, DOT_FP32, PRECISION)
        for start_m in range(full_hi, hi, BLOCK_M):
            acc_dk, acc_dv = _dkdv_block(
                acc_dk, acc_dv, b_kt, b_vt, p_q, p_do, p_lse, p_delta, p_bias, start_m, offs_m0, offs_n, offs_d,
                offs_dv, len_q, len_k, stride_qm, stride_dom, stride_lm, stride_bias_m, stride_bias_n, scale,
                qk_scale, cap_scale, cap_out, window_left, window_right,
                seed, drop_row0, drop_col0, seq_k, drop_threshold, drop_scale,
                D, DV, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_DROPOUT, DOT_FP32, PRECISION)

    dk_base = DK + b64 * stride_dkb + i_hk.to(tl.int64) * stride_dkh + bos_k.to(tl.int64) * stride_dkn
    dv_base = DV_ + b64 * stride_dvb + i_hk.to(tl.int64) * stride_dvh + bos_k.to(tl.int64) * stride_dvn
    p_dk = dk_base + offs_n64[:, None] * stride_dkn + offs_d[None, :] * stride_dkd        # [BN, BD]
    p_dv = dv_base + offs_n64[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd       # [BN, BDV]
    tl.store(p_dk, acc_dk.to(DK.dtype.element_ty), mask=m_n[:, None] & (offs_d < D)[None, :])
    tl.store(p_dv, acc_dv.to(DV_.dtype.element_ty), mask=m_n[:, None] & (offs_dv < DV)[None, :])


@triton.jit
def _dq_block(acc_dq, b_q, b_do, b_lse2, b_delta, p_kt, p_vt, p_bias, p_dbias, start_n, offs_m, offs_n, offs_d,
              offs_dv, len_q, len_k, stride_kn, stride_vn, stride_bias_n, scale, qk_scale, cap_scale, cap_out,
              window_left, window_right, seed, drop_row0, drop_col0, drop_stride, drop_threshold, drop_scale,
              D: tl.constexpr, DV: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr,
              HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, STORE_DS: tl.constexpr, DOT_FP32: tl.constexpr,
              PRECISION: tl.constexpr):
    """Key block ``[start_n, start_n + BN)`` into dQ of a query block (and dS into the bias gradient)."""
    i_n = start_n + offs_n                                                              # [BN]
    m_n = i_n < len_k
    m_kd = (offs_d < D)[:, None]
    m_vd = (offs_dv < DV)[:, None]
    if MASKED:
        m_kd = m_kd & m_n[None, :]
        m_vd = m_vd & m_n[None, :]
    b_kt = tl.load(p_kt + start_n * stride_kn, mask=m_kd, other=0.0)                    # [BD, BN]
    b_vt = tl.load(p_vt + start_n * stride_vn, mask=m_vd, other=0.0)                    # [BDV, BN]
    if DOT_FP32:
        b_kt = b_kt.to(tl.float32)
        b_vt = b_vt.to(tl.float32)
    b_p, b_t = _probs(b_q, b_kt, p_bias, start_n, b_lse2, offs_m, i_n, len_q, len_k, stride_bias_n,
                      qk_scale, cap_scale, cap_out, window_left, window_right,
                      MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, PRECISION)   # [BM, BN]
    b_dp = tl.dot(b_do, b_vt, input_precision=PRECISION)                               # [BM, BN]
    if HAS_DROPOUT:
        keep = dropout_keep(seed, drop_row0, drop_col0, drop_stride, offs_m, i_n, drop_threshold)
        b_dp = tl.where(keep, b_dp * drop_scale, 0.0)
    b_ds = b_p * (b_dp - b_delta[:, None])                                              # [BM, BN]
    if STORE_DS:
        tl.store(p_dbias + start_n, b_ds, mask=(offs_m < len_q)[:, None] & m_n[None, :])
    if HAS_SOFTCAP:
        b_ds = b_ds * (scale * (1.0 - b_t * b_t))
    else:
        b_ds = b_ds * scale
    acc_dq += tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), input_precision=PRECISION)  # [BM, BD]
    return acc_dq


@triton.jit(do_not_specialize=["num_heads", "group", "seq_q", "seq_k", "window_left", "window_right",
                               "drop_threshold", "tune_bucket"])
def attention_backward_dq_kernel(
        Q, K, V, BIAS, SEED, DOUT, LSE, DELTA, DQ, DBIAS, CU_Q, CU_K,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_lb, stride_lh, stride_lm,
        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
        num_heads, group, seq_q, seq_k,
        scale, qk_scale, cap_scale, cap_out, window_left, window_right, drop_threshold, drop_scale, tune_bucket,
        D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, STORE_DS: tl.constexpr, DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ, and with STORE_DS the logit gradient dS into DBIAS, a contiguous float32 (B, Hq, Sq, Sk)
    buffer the caller zeroed (hidden entries are skipped, they stay 0). Grid
    ``(cdiv(max_seq_q, BLOCK_M), Hq, B)``; the rest as in `attention_backward_dkdv_kernel`."""
    tl.static_assert(BLOCK_D >= D and BLOCK_DV >= DV and BLOCK_DV <= 256 and BLOCK_D <= 256)
    i_m, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // group
    b64, h64 = i_b.to(tl.int64), i_h.to(tl.int64)
    if IS_VARLEN:
        bos_q = tl.load(CU_Q + i_b)
        len_q = tl.load(CU_Q + i_b + 1) - bos_q
        bos_k = tl.load(CU_K + i_b)
        len_k = tl.load(CU_K + i_b + 1) - bos_k
        drop_row0 = h64 * seq_q + bos_q
        drop_col0 = bos_k
    else:
        bos_q = i_m * 0
        len_q = seq_q
        bos_k = i_m * 0
        len_k = seq_k
        drop_row0 = (b64 * num_heads + i_h) * seq_q
        drop_col0 = i_m * 0
    m0 = i_m * BLOCK_M
    if m0 >= len_q:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)                                                 # [BM]
    offs_n = tl.arange(0, BLOCK_N)                                                      # [BN]
    offs_d = tl.arange(0, BLOCK_D)                                                      # [BD]
    offs_dv = tl.arange(0, BLOCK_DV)                                                    # [BDV]
    m_m = offs_m < len_q
    offs_m64 = offs_m.to(tl.int64)  # row offsets: Sq * stride may pass 2**31
    q_base = Q + b64 * stride_qb + h64 * stride_qh + bos_q.to(tl.int64) * stride_qm
    do_base = DOUT + b64 * stride_dob + h64 * stride_doh + bos_q.to(tl.int64) * stride_dom
    l_off = b64 * stride_lb + h64 * stride_lh + bos_q.to(tl.int64) * stride_lm
    b_q = tl.load(q_base + offs_m64[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                  mask=m_m[:, None] & (offs_d < D)[None, :], other=0.0)                 # [BM, BD]
    b_do = tl.load(do_base + offs_m64[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                   mask=m_m[:, None] & (offs_dv < DV)[None, :], other=0.0)              # [BM, BDV]
    if DOT_FP32:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    b_lse2 = tl.load(LSE + l_off + offs_m64 * stride_lm, mask=m_m, other=0.0) * LOG2E     # [BM]
    b_lse2 = tl.where(b_lse2 == float("-inf"), float("inf"), b_lse2)
    b_delta = tl.load(DELTA + l_off + offs_m64 * stride_lm, mask=m_m, other=0.0)         # [BM]

    k_base = K + b64 * stride_kb + i_hk.to(tl.int64) * stride_kh + bos_k.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + i_hk.to(tl.int64) * stride_vh + bos_k.to(tl.int64) * stride_vn
    p_kt = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd           # [BD, BN]
    p_vt = v_base + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd          # [BDV, BN]
    p_bias = BIAS
    if BIAS_KIND != BIAS_NONE:
        p_bias = (BIAS + b64 * stride_bias_b + h64 * stride_bias_h
                  + offs_m64[:, None] * stride_bias_m + offs_n[None, :] * stride_bias_n)  # [BM, BN]
    p_dbias = DBIAS
    if STORE_DS:
        p_dbias = (DBIAS + (b64 * num_heads + h64) * seq_q * seq_k
                   + offs_m64[:, None] * seq_k + offs_n[None, :])            # [BM, BN]
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    acc_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)                            # [BM, BD]
    lo, full_lo, full_hi, hi = kv_block_range(m0, len_q, len_k, window_left, window_right,
                                              BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for start_n in range(lo, tl.minimum(full_lo, hi), BLOCK_N):
        acc_dq = _dq_block(acc_dq, b_q, b_do, b_lse2, b_delta, p_kt, p_vt, p_bias, p_dbias, start_n, offs_m, offs_n,
                           offs_d, offs_dv, len_q, len_k, stride_kn, stride_vn, stride_bias_n, scale, qk_scale,
                           cap_scale, cap_out, window_left, window_right, seed, drop_row0, drop_col0, seq_k,
                           drop_threshold, drop_scale, D, DV, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND,
                           HAS_DROPOUT, STORE_DS, DOT_FP32, PRECISION)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        acc_dq = _dq_block(acc_dq, b_q, b_do, b_lse2, b_delta, p_kt, p_vt, p_bias, p_dbias, start_n, offs_m, offs_n,
                           offs_d, offs_dv, len_q, len_k, stride_kn, stride_vn, stride_bias_n, scale, qk_scale,
                           cap_scale, cap_out, window_left, window_right, seed, drop_row0, drop_col0, seq_k,
                           drop_threshold, drop_scale, D, DV, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND,
                           HAS_DROPOUT, STORE_DS, DOT_FP32, PRECISION)
    for start_n in range(full_hi, hi, BLOCK_N):
        acc_dq = _dq_block(acc_dq, b_q, b_do, b_lse2, b_delta, p_kt, p_vt, p_bias, p_dbias, start_n, offs_m, offs_n,
                           offs_d, offs_dv, len_q, len_k, stride_kn, stride_vn, stride_bias_n, scale, qk_scale,
                           cap_scale, cap_out, window_left, window_right, seed, drop_row0, drop_col0, seq_k,
                           drop_threshold, drop_scale, D, DV, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND,
                           HAS_DROPOUT, STORE_DS, DOT_FP32, PRECISION)
    dq_base = DQ + b64 * stride_dqb + h64 * stride_dqh + bos_q.to(tl.int64) * stride_dqm
    p_dq = dq_base + offs_m64[:, None] * stride_dqm + offs_d[None, :] * stride_dqd        # [BM, BD]
    tl.store(p_dq, acc_dq.to(DQ.dtype.element_ty), mask=m_m[:, None] & (offs_d < D)[None, :])
