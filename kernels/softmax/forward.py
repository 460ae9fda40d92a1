"""Fused softmax attention forward, FlashAttention-2 style (Dao 2023), dense and varlen.

One program owns BLOCK_M query rows of one query head and streams the key blocks they can
see, keeping a running maximum ``m``, a running sum ``l`` and an unnormalized output ``acc``
(online softmax, Milakov & Gimelshein 2018), in the log2 domain (see ``_common``):

    s2_j    = log2(e) * logits_j                       (scale, softcap, bias folded in)
    m'      = max(m, max_j s2_j)
    l'      = l * 2^(m - m') + sum_j 2^(s2_j - m')
    acc'    = acc * 2^(m - m') + sum_j 2^(s2_j - m') * keep_j * v_j
    out     = acc / l / (1 - p)           lse = (m + log2 l) * ln(2)

``keep_j`` is the in-kernel dropout draw (1 without dropout); ``l`` and ``lse`` are taken before
dropout. A row that sees no key keeps ``m = -inf``, ``l = 0`` and writes zeros and ``lse = -inf``.
GQA: query head ``h`` reads kv head ``h // GROUP``; k and v are never repeated.
"""
import triton
import triton.language as tl

from ._common import (BIAS_BOOL, BIAS_FLOAT, BIAS_NONE, LN2, LOG2E, dropout_keep, kv_block_range, tanh_exp2,
                      window_mask)


@triton.jit
def _forward_block(acc, l_i, m_i, b_q, p_k, p_v, p_bias, start_n, offs_m, offs_n, offs_d, offs_dv,
                   len_q, len_k, stride_kn, stride_vn, stride_bias_n,
                   qk_scale, cap_scale, cap_out, window_left, window_right,
                   seed, drop_row0, drop_col0, drop_stride, drop_threshold,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """One key block ``[start_n, start_n + BN)`` into the running (acc, l, m) of a query block."""
    i_n = start_n + offs_n                                                              # [BN]
    m_n = i_n < len_k
    m_kd = (offs_d < D)[:, None]
    m_vd = (offs_dv < DV)[None, :]
    if MASKED:
        m_kd = m_kd & m_n[None, :]
        m_vd = m_vd & m_n[:, None]
    b_kt = tl.load(p_k + start_n * stride_kn, mask=m_kd, other=0.0)                     # [BD, BN]
    b_v = tl.load(p_v + start_n * stride_vn, mask=m_vd, other=0.0)                      # [BN, BDV]
    if DOT_FP32:
        b_kt = b_kt.to(tl.float32)
        b_v = b_v.to(tl.float32)
    b_s = tl.dot(b_q, b_kt, input_precision=PRECISION)                                  # [BM, BN]
    if HAS_SOFTCAP:
        b_s = cap_out * tanh_exp2(b_s, cap_scale)
    else:
        b_s = b_s * qk_scale
    if BIAS_KIND == BIAS_FLOAT:
        m_b = (offs_m < len_q)[:, None] & m_n[None, :]
        b_s += tl.load(p_bias + start_n * stride_bias_n, mask=m_b, other=0.0).to(tl.float32) * LOG2E
    elif BIAS_KIND == BIAS_BOOL:
        m_b = (offs_m < len_q)[:, None] & m_n[None, :]
        b_s = tl.where(tl.load(p_bias + start_n * stride_bias_n, mask=m_b, other=0) != 0, b_s, float("-inf"))
    if MASKED:
        m_vis = window_mask(offs_m, i_n, len_q, len_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        b_s = tl.where(m_vis, b_s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(b_s, 1))                                             # [BM]
    # A row that has seen only -inf so far: keep every exponent finite (2^(-inf - 0) = 0).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    b_p = tl.exp2(b_s - m_safe[:, None])                                                # [BM, BN]
    alpha = tl.exp2(m_i - m_safe)                                                       # [BM]
    l_i = l_i * alpha + tl.sum(b_p, 1)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, drop_row0, drop_col0, drop_stride, offs_m, i_n, drop_threshold)
        b_p = tl.where(keep, b_p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["num_heads", "group", "seq_q", "seq_k", "window_left", "window_right",
                               "drop_threshold", "tune_bucket"])
def attention_forward_kernel(
        Q, K, V, BIAS, SEED, OUT, LSE, CU_Q, CU_K,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_lb, stride_lh, stride_lm,
        num_heads, group, seq_q, seq_k,
        qk_scale, cap_scale, cap_out, window_left, window_right, drop_threshold, drop_scale, tune_bucket,
        D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BIAS_KIND: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid ``(cdiv(max_seq_q, BLOCK_M), Hq, B)``.

    Dense: q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, DV), out (B, Hq, Sq, DV),
    lse (B, Hq, Sq), bias (B|1, Hq|1, Sq|1, Sk|1) through strides (0 on broadcast dims);
    ``seq_q``/``seq_k`` are Sq/Sk. Varlen (IS_VARLEN): q (total_q, Hq, D) etc. seen with
    batch stride 0, sequence ``b`` = rows ``CU_Q[b]:CU_Q[b+1]``; ``seq_q``/``seq_k`` are the
    packed totals. ``qk_scale = scale * log2(e)``; with softcap ``cap_scale = 2 log2(e) scale /
    softcap`` and ``cap_out = softcap * log2(e)``. Dropout counter of (b, h, i, j): dense
    ``((b Hq + h) Sq + i) Sk + j``, varlen ``(h total_q + row_q) total_k + row_k``.
    ``tune_bucket`` only keys the autotuner.
    """
    tl.static_assert(BLOCK_D >= D and BLOCK_DV >= DV and BLOCK_DV <= 256 and BLOCK_D <= 256)
    i_m, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // group
    if IS_VARLEN:
        bos_q = tl.load(CU_Q + i_b)
        len_q = tl.load(CU_Q + i_b + 1) - bos_q
        bos_k = tl.load(CU_K + i_b)
        len_k = tl.load(CU_K + i_b + 1) - bos_k
        drop_row0 = i_h.to(tl.int64) * seq_q + bos_q
        drop_col0 = bos_k
    else:
        bos_q = i_m * 0
        len_q = seq_q
        bos_k = i_m * 0
        len_k = seq_k
        drop_row0 = (i_b.to(tl.int64) * num_heads + i_h) * seq_q
        drop_col0 = i_m * 0
    m0 = i_m * BLOCK_M
    if m0 >= len_q:  # varlen: this sequence is shorter than max_seqlen_q
        return

    # 64-bit batch/head/sequence-start offsets: B * H * S * D overflows int32 at real sizes.
    q_base = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh + bos_q.to(tl.int64) * stride_qm
    k_base = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh + bos_k.to(tl.int64) * stride_kn
    v_base = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh + bos_k.to(tl.int64) * stride_vn
    offs_m = m0 + tl.arange(0, BLOCK_M)                                                 # [BM]
    offs_n = tl.arange(0, BLOCK_N)                                                      # [BN]
    offs_d = tl.arange(0, BLOCK_D)                                                      # [BD]
    offs_dv = tl.arange(0, BLOCK_DV)                                                    # [BDV]
    m_m = offs_m < len_q
    offs_m64 = offs_m.to(tl.int64)  # row offsets: Sq * stride may pass 2**31

    p_q = q_base + offs_m64[:, None] * stride_qm + offs_d[None, :] * stride_qd            # [BM, BD]
    b_q = tl.load(p_q, mask=m_m[:, None] & (offs_d < D)[None, :], other=0.0)
    if DOT_FP32:
        b_q = b_q.to(tl.float32)
    p_k = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd            # [BD, BN] (k^T)
    p_v = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd           # [BN, BDV]
    p_bias = BIAS
    if BIAS_KIND != BIAS_NONE:
        p_bias = (BIAS + i_b.to(tl.int64) * stride_bias_b + i_h.to(tl.int64) * stride_bias_h
                  + offs_m64[:, None] * stride_bias_m + offs_n[None, :] * stride_bias_n)  # [BM, BN]
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)                              # [BM, BDV]
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                                         # [BM]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)                           # [BM]

    lo, full_lo, full_hi, hi = kv_block_range(m0, len_q, len_k, window_left, window_right,
                                              BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    # Masked edge, unmasked middle, masked edge: the middle blocks carry no mask work.
    for start_n in range(lo, tl.minimum(full_lo, hi), BLOCK_N):
        acc, l_i, m_i = _forward_block(
            acc, l_i, m_i, b_q, p_k, p_v, p_bias, start_n, offs_m, offs_n, offs_d, offs_dv,
            len_q, len_k, stride_kn, stride_vn, stride_bias_n, qk_scale, cap_scale, cap_out,
            window_left, window_right, seed, drop_row0, drop_col0, seq_k, drop_threshold,
            D, DV, BLOCK_D, BLOCK_DV, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_DROPOUT,
            DOT_FP32, PRECISION)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _forward_block(
            acc, l_i, m_i, b_q, p_k, p_v, p_bias, start_n, offs_m, offs_n, offs_d, offs_dv,
            len_q, len_k, stride_kn, stride_vn, stride_bias_n, qk_scale, cap_scale, cap_out,
            window_left, window_right, seed, drop_row0, drop_col0, seq_k, drop_threshold,
            D, DV, BLOCK_D, BLOCK_DV, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_DROPOUT,
            DOT_FP32, PRECISION)
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _forward_block(
            acc, l_i, m_i, b_q, p_k, p_v, p_bias, start_n, offs_m, offs_n, offs_d, offs_dv,
            len_q, len_k, stride_kn, stride_vn, stride_bias_n, qk_scale, cap_scale, cap_out,
            window_left, window_right, seed, drop_row0, drop_col0, seq_k, drop_threshold,
            D, DV, BLOCK_D, BLOCK_DV, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BIAS_KIND, HAS_DROPOUT,
            DOT_FP32, PRECISION)

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    b_o = acc / l_safe[:, None]
    if HAS_DROPOUT:
        b_o = b_o * drop_scale
    b_lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))            # [BM]

    o_base = OUT + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh + bos_q.to(tl.int64) * stride_om
    p_o = o_base + offs_m64[:, None] * stride_om + offs_dv[None, :] * stride_od           # [BM, BDV]
    tl.store(p_o, b_o.to(OUT.dtype.element_ty), mask=m_m[:, None] & (offs_dv < DV)[None, :])
    l_base = LSE + i_b.to(tl.int64) * stride_lb + i_h.to(tl.int64) * stride_lh + bos_q.to(tl.int64) * stride_lm
    tl.store(l_base + offs_m64 * stride_lm, b_lse, mask=m_m)


@triton.jit
def fill_tail_kernel(X, CU, batch, total, stride_r, stride_h, stride_c, value,
                     NUM_COLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Varlen rows ``[CU[batch], total)`` of ``X`` (total, H, NUM_COLS) belong to no sequence:
    fill them with ``value``. Grid ``(programs, H)``, grid-stride over rows (their count is only
    known on the device)."""
    i_p, n_p, i_h = tl.program_id(0), tl.num_programs(0), tl.program_id(1)
    start = tl.load(CU + batch)
    offs_c = tl.arange(0, BLOCK_C)                                                      # [BC]
    b_x = (tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32) + value).to(X.dtype.element_ty)  # [BR, BC]
    x_base = X + i_h.to(tl.int64) * stride_h
    for r0 in range(start + i_p * BLOCK_R, total, n_p * BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)                                             # [BR]
        p_x = x_base + offs_r.to(tl.int64)[:, None] * stride_r + offs_c[None, :] * stride_c
        tl.store(p_x, b_x, mask=(offs_r < total)[:, None] & (offs_c < NUM_COLS)[None, :])
