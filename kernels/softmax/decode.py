"""Flash-decoding: softmax attention of a few queries over many keys, split over the keys.

With few queries (decoding: ``Sq`` = 1..16) the usual grid over query blocks has
only ``B * Hq`` programs, far too few to read a long KV cache at full bandwidth.
Flash-decoding (Dao et al., 2023) splits the keys into ``S`` chunks and runs one
program per (batch, kv head, row block, chunk); a second, small kernel merges
the partial results with their log-sum-exps.

Rows. All query heads of one kv-head group (``G = Hq // Hkv``) times all ``Sq``
queries form the rows of one tile, ``row = g * Sq + i`` for query ``i`` of head
``h = h_kv * G + g``, so a chunk of K and V is read once per group (GQA/MQA), not
once per query head.

Split kernel, for the rows of one tile and the keys ``n`` of chunk ``s``::

    x_mn  = scale * q_m . k_n                               (fp32 accumulation)
    x_mn  = softcap * tanh(x_mn / softcap)                  (softcap > 0)
    x_mn  = x_mn + bias_mn   or   -inf where not keep_mn    (attn_bias)
    x_mn  = -inf where key n is outside query m's causal / sliding window
    lse_ms = log sum_n exp(x_mn)                            (-inf: chunk hides every key)
    o_ms   = sum_n exp(x_mn - lse_ms) v_n                   (0 when lse_ms = -inf)

computed online over blocks of ``BLOCK_N`` keys in base 2 (``log2(e)`` folded into
the scale, ``exp2``), with a running maximum that is replaced by 0 while it is
still ``-inf``, so a row whose keys are all masked gives ``l = 0`` and no NaN.
``tanh(y) = 1 - 2 / (exp(2 y) + 1)``, which saturates to +-1 without overflow.

Combine kernel, per row over the ``S`` chunks::

    lse = log sum_s exp(lse_s),   o = sum_s exp(lse_s - lse) o_s

with the maximum of the ``lse_s`` as stabilizer (0 when all are ``-inf``: the row
saw no key, ``o = 0``, ``lse = -inf``). With one chunk the split kernel writes the
final ``o`` and ``lse`` itself and no combine runs.

Masks (``off = Sk - Sq``, bottom-right): query ``i`` sees key ``j`` iff
``i + off - left <= j <= i + off + right``; the launcher folds causal into
``right`` and passes a bound beyond every key for an unbounded side. Keys that
every row of the tile sees (no causal/window mask there) run without mask work.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Arguments that follow the cache length: a new decoding step must not recompile.
_SEQ_ARGS = ["diag_offset", "window_left", "window_right", "kv_start", "kv_end", "chunk",
             "full_lo", "full_hi"]


@triton.jit
def _load_2d(p, m_0, m_1, MASK_0: tl.constexpr, MASK_1: tl.constexpr):
    """Load a 2-D block (zeros where masked), masking dim 0 by m_0 and dim 1 by m_1 only where
    asked: an all-true mask the compiler cannot prove still costs vectorized loads."""
    if MASK_0:
        if MASK_1:
            b_x = tl.load(p, mask=m_0[:, None] & m_1[None, :], other=0.0)
        else:
            b_x = tl.load(p, mask=m_0[:, None], other=0.0)
    else:
        if MASK_1:
            b_x = tl.load(p, mask=m_1[None, :], other=0.0)
        else:
            b_x = tl.load(p)
    return b_x


@triton.jit
def _attend_block(b_acc, b_m, b_l, b_q, k_ptr, v_ptr, p_brow, start_n, n_end, b_row_lo, b_row_hi, m_r, qk_scale,
                  softcap2, stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, HEAD_DIM: tl.constexpr,
                  HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  MASKED: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Keys [start_n, start_n + BLOCK_N) into the running (acc, max, sum) of the tile's rows.

    k_ptr, v_ptr: k and v at key start_n (scalars); p_brow [BM]: each row's bias at key 0.
    MASKED: the block may hold keys at or past `n_end` or keys outside some row's
    causal/window range; otherwise every key is in bounds and visible to every row.
    """
    o_n = start_n + tl.arange(0, BLOCK_N)                                           # [BN]
    m_n = o_n < n_end
    m_d = tl.arange(0, BLOCK_D) < HEAD_DIM                                          # [BD]
    m_v = tl.arange(0, BLOCK_DV) < HEAD_DIM_V                                       # [BDV]
    # Pointer tiles rebuilt each step from the scalar k_ptr / v_ptr: carried through the loop
    # instead, they would hold two registers per element.
    o_nb = tl.arange(0, BLOCK_N).to(tl.int64)
    p_kt = k_ptr + o_nb[None, :] * stride_kn + tl.arange(0, BLOCK_D)[:, None] * stride_kd   # [BD, BN]
    p_v = v_ptr + o_nb[:, None] * stride_vn + tl.arange(0, BLOCK_DV)[None, :] * stride_vd   # [BN, BDV]
    b_kt = _load_2d(p_kt, m_d, m_n, HEAD_DIM != BLOCK_D, MASKED)                    # [BD, BN]
    b_v = _load_2d(p_v, m_n, m_v, MASKED, HEAD_DIM_V != BLOCK_DV)                   # [BN, BDV]
    if DOT_FP32:
        b_kt = b_kt.to(tl.float32)
        b_v = b_v.to(tl.float32)

    b_s = tl.dot(b_q, b_kt, input_precision=PRECISION)                              # [BM, BN] fp32
    if HAS_SOFTCAP:
        # qk_scale = 2 log2(e) scale / softcap, softcap2 = log2(e) softcap: b_s = log2(e) softcap tanh(.)
        b_s = softcap2 * (1.0 - 2.0 / (tl.exp2(b_s * qk_scale) + 1.0))
    else:
        b_s = b_s * qk_scale                                                        # log2(e) scale folded in

    if BIAS_KIND != 0:
        p_b = p_brow[:, None] + o_n.to(tl.int64)[None, :] * stride_bn               # [BM, BN]
        b_b = _load_2d(p_b, m_r, m_n, True, MASKED)                                 # [BM, BN]
        if BIAS_KIND == 1:
            b_s += b_b.to(tl.float32) * LOG2E
        else:
            b_s = tl.where(b_b != 0, b_s, float("-inf"))
    if MASKED:
        m_s = (o_n[None, :] >= b_row_lo[:, None]) & (o_n[None, :] <= b_row_hi[:, None]) & m_n[None, :]
        b_s = tl.where(m_s, b_s, float("-inf"))

    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))                                       # [BM]
    # While a row has seen no key its maximum is -inf: shift by 0 instead, so exp2 gives 0, not NaN.
    b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)                      # [BM]
    b_p = tl.exp2(b_s - b_shift[:, None])                                           # [BM, BN]
    b_alpha = tl.exp2(b_m - b_shift)                                                # [BM]
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)  # [BM, BDV]
    return b_acc, b_m_new, b_l


@triton.jit
def _attend_range(b_acc, b_m, b_l, b_q, k_base, v_base, p_brow, lo, hi, n_end, b_row_lo, b_row_hi, m_r, qk_scale,
                  softcap2, stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, HEAD_DIM: tl.constexpr,
                  HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  MASKED: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
                  PRECISION: tl.constexpr):
    """The blocks starting at lo, lo + BLOCK_N, ... below hi; k_base, v_base, p_brow point at key 0."""
    n64 = lo.to(tl.int64)
    k_ptr = k_base + n64 * stride_kn
    v_ptr = v_base + n64 * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        b_acc, b_m, b_l = _attend_block(b_acc, b_m, b_l, b_q, k_ptr, v_ptr, p_brow, start_n, n_end, b_row_lo,
                                        b_row_hi, m_r, qk_scale, softcap2, stride_kn, stride_kd, stride_vn, stride_vd,
                                        stride_bn, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                                        MASKED, BIAS_KIND, HAS_SOFTCAP, DOT_FP32, PRECISION)
        k_ptr += BLOCK_N * stride_kn
        v_ptr += BLOCK_N * stride_vn
    return b_acc, b_m, b_l


@triton.jit(do_not_specialize=_SEQ_ARGS)
def decode_split_kernel(
        Q, K, V, BIAS, O, LSE,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_bb, stride_bh, stride_bm, stride_bn,
        stride_ob, stride_oh, stride_om, stride_os, stride_od,
        stride_lb, stride_lh, stride_lm, stride_ls,
        num_kv_heads, group, seq_q, num_splits, num_m_blocks,
        qk_scale, softcap2, diag_offset, window_left, window_right,
        kv_start, kv_end, chunk, full_lo, full_hi,
        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BIAS_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Partial attention of one row block of one kv-head group over one chunk of keys.

    Program id = ((batch * Hkv + kv_head) * num_splits + split) * num_m_blocks + row_block
    (row blocks of one chunk run side by side and share its K/V in cache).
    Writes o (normalized over the chunk, zero if it saw nothing) to
    O[b, h, i, split, :] and lse (natural log, -inf if it saw nothing) to
    LSE[b, h, i, split]; with one split those are the final out and lse (stride_os = stride_ls = 0).

    Keys: chunk `split` is [kv_start + split * chunk, min(kv_start + (split + 1) * chunk, kv_end)),
    kv_start and chunk multiples of BLOCK_N. Every row of the tile sees every key of
    [full_lo, full_hi) (full_lo a multiple of BLOCK_N) as far as causal/window go.
    BIAS_KIND: 0 none, 1 float bias added, 2 bool (as uint8) keep mask.
    """
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16 and BLOCK_DV >= 16)
    i_pid = tl.program_id(0)
    i_m = i_pid % num_m_blocks
    i_s = (i_pid // num_m_blocks) % num_splits
    i_bh = i_pid // (num_m_blocks * num_splits)
    i_b = (i_bh // num_kv_heads).to(tl.int64)
    i_hkv = i_bh % num_kv_heads

    o_r = i_m * BLOCK_M + tl.arange(0, BLOCK_M)                                     # [BM] rows of the tile
    m_r = o_r < group * seq_q
    o_i = o_r % seq_q                                                               # [BM] query index
    o_h = (i_hkv * group + o_r // seq_q).to(tl.int64)                               # [BM] query head
    o_d = tl.arange(0, BLOCK_D)
    o_v = tl.arange(0, BLOCK_DV)
    m_d = o_d < HEAD_DIM
    m_v = o_v < HEAD_DIM_V

    p_q = Q + i_b * stride_qb + o_h[:, None] * stride_qh + o_i[:, None] * stride_qm + o_d[None, :] * stride_qd
    b_q = _load_2d(p_q, m_r, m_d, True, HEAD_DIM != BLOCK_D)                        # [BM, BD]
    if DOT_FP32:
        b_q = b_q.to(tl.float32)
    # Pointers at key 0 of this (batch, kv head) and of each row's bias; key n adds n * stride (64-bit).
    k_base = K + i_b * stride_kb + i_hkv.to(tl.int64) * stride_kh
    v_base = V + i_b * stride_vb + i_hkv.to(tl.int64) * stride_vh
    p_brow = BIAS + i_b * stride_bb + o_h * stride_bh + o_i.to(tl.int64) * stride_bm  # [BM] (read if BIAS_KIND)

    # Row i sees keys [i + off - left, i + off + right] (the launcher folded causal in).
    b_diag = o_i + diag_offset                                                      # [BM]
    b_row_lo = b_diag - window_left
    b_row_hi = b_diag + window_right

    n_start = kv_start + i_s * chunk
    n_end = tl.minimum(n_start + chunk, kv_end)
    mid_lo = tl.minimum(tl.maximum(n_start, full_lo), n_end)
    mid_hi = mid_lo + (tl.maximum(tl.minimum(n_end, full_hi) - mid_lo, 0) // BLOCK_N) * BLOCK_N

    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)                         # [BM, BDV]
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)                       # [BM] running max (log2)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)                                     # [BM] running sum
    # [n_start, mid_lo) masked, [mid_lo, mid_hi) whole blocks every row sees, [mid_hi, n_end) masked.
    b_acc, b_m, b_l = _attend_range(b_acc, b_m, b_l, b_q, k_base, v_base, p_brow, n_start, mid_lo, n_end, b_row_lo,
                                    b_row_hi, m_r, qk_scale, softcap2, stride_kn, stride_kd, stride_vn, stride_vd,
                                    stride_bn, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, True, BIAS_KIND,
                                    HAS_SOFTCAP, DOT_FP32, PRECISION)
    b_acc, b_m, b_l = _attend_range(b_acc, b_m, b_l, b_q, k_base, v_base, p_brow, mid_lo, mid_hi, n_end, b_row_lo,
                                    b_row_hi, m_r, qk_scale, softcap2, stride_kn, stride_kd, stride_vn, stride_vd,
                                    stride_bn, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, False, BIAS_KIND,
                                    HAS_SOFTCAP, DOT_FP32, PRECISION)
    b_acc, b_m, b_l = _attend_range(b_acc, b_m, b_l, b_q, k_base, v_base, p_brow, mid_hi, n_end, n_end, b_row_lo,
                                    b_row_hi, m_r, qk_scale, softcap2, stride_kn, stride_kd, stride_vn, stride_vd,
                                    stride_bn, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, True, BIAS_KIND,
                                    HAS_SOFTCAP, DOT_FP32, PRECISION)

    m_seen = b_l > 0                                                                # [BM]
    b_o = b_acc / tl.where(m_seen, b_l, 1.0)[:, None]                               # [BM, BDV] 0 if unseen
    b_lse = tl.where(m_seen, (b_m + tl.log2(tl.where(m_seen, b_l, 1.0))) * LN2, float("-inf"))  # [BM]

    i_s64 = i_s.to(tl.int64)
    p_o = (O + i_b * stride_ob + o_h[:, None] * stride_oh + o_i[:, None] * stride_om + i_s64 * stride_os
           + o_v[None, :] * stride_od)                                              # [BM, BDV]
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_r[:, None] & m_v[None, :])
    p_lse = LSE + i_b * stride_lb + o_h * stride_lh + o_i * stride_lm + i_s64 * stride_ls  # [BM]
    tl.store(p_lse, b_lse, mask=m_r)


@triton.jit
def decode_combine_kernel(O_PART, LSE_PART, O, LSE, num_rows, num_splits, HEAD_DIM_V: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Merge the chunks of BLOCK_R rows (grid: ceil(B * Hq * Sq / BLOCK_R), ceil(Dv / BLOCK_DV)).

    O_PART (rows, S, Dv) and LSE_PART (rows, S) float32, O (rows, Dv) and LSE (rows,)
    contiguous. lse = log sum_s exp(lse_s), o = sum_s exp(lse_s - lse) o_s.
    """
    i_r = tl.program_id(0)
    i_v = tl.program_id(1)
    o_r = (i_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)                      # [BR]
    o_s = tl.arange(0, BLOCK_S)                                                     # [BS]
    o_v = i_v * BLOCK_DV + tl.arange(0, BLOCK_DV)                                   # [BDV]
    m_r = o_r < num_rows
    m_s = o_s < num_splits
    m_v = o_v < HEAD_DIM_V

    m_rs = m_r[:, None] & m_s[None, :]                                              # [BR, BS]
    b_lse = tl.load(LSE_PART + o_r[:, None] * num_splits + o_s[None, :], mask=m_rs, other=float("-inf"))
    b_max = tl.max(b_lse, 1)                                                        # [BR]
    b_shift = tl.where(b_max == float("-inf"), 0.0, b_max)    # all -inf: weights 0, no NaN
    b_w = tl.exp2((b_lse - b_shift[:, None]) * LOG2E)                               # [BR, BS]
    b_sum = tl.sum(b_w, 1)                                                          # [BR]
    b_safe = tl.where(b_sum > 0, b_sum, 1.0)
    p_o = (O_PART + o_r[:, None, None] * num_splits * HEAD_DIM_V + o_s[None, :, None] * HEAD_DIM_V
           + o_v[None, None, :])                                                    # [BR, BS, BDV]
    b_o_part = tl.load(p_o, mask=m_rs[:, :, None] & m_v[None, None, :], other=0.0)  # [BR, BS, BDV]
    b_o = tl.sum(b_w[:, :, None] * b_o_part, 1) / b_safe[:, None]                   # [BR, BDV]
    tl.store(O + o_r[:, None] * HEAD_DIM_V + o_v[None, :], b_o.to(O.dtype.element_ty),
             mask=m_r[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(LSE + o_r, tl.where(b_sum > 0, b_shift + tl.log(b_safe), float("-inf")), mask=m_r)
