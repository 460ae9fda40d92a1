"""Pieces the softmax attention kernels share: the score of a block, the masks, the dropout draw,
and which blocks a program visits.

Positions are local to one sequence. With ``off = len_k - len_q`` (bottom-right alignment),
query ``i`` sees key ``j`` iff ``i + off - LEFT <= j <= i + off + RIGHT`` (a side that is
unbounded has no bound) and ``j < len_k``. The launcher folds ``causal`` into ``RIGHT = 0``.

Scores live in the log2 domain: with ``x = q . k`` (float32),

    s2 = x * scale * log2(e)                                   (no softcap)
    s2 = softcap * log2(e) * tanh(x * scale / softcap)         (softcap)
    s2 += bias * log2(e)                                        (float bias)

so ``exp2(s2 - m2) = exp(s - m)`` and the kernels never call ``exp``.
"""
import triton
import triton.language as tl

# Globals a kernel reads must be constexpr instances (an annotation is not enough on the GPU).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# attn_bias kinds (a constexpr of every kernel)
BIAS_NONE = tl.constexpr(0)
BIAS_FLOAT = tl.constexpr(1)
BIAS_BOOL = tl.constexpr(2)


@triton.jit
def tanh_exp2(x, TWO_LOG2E_SCALE):
    """tanh(x * c) for ``TWO_LOG2E_SCALE = 2 * log2(e) * c``: ``1 - 2 / (exp2(2 log2(e) x c) + 1)``.

    Portable (the interpreter has no libdevice); exactly +-1 at +-inf, absolute error ~1e-7."""
    return 1.0 - 2.0 / (tl.exp2(x * TWO_LOG2E_SCALE) + 1.0)


@triton.jit
def kv_block_range(m0, len_q, len_k, window_left, window_right,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key blocks that query rows ``[m0, m0 + BLOCK_M)`` visit, as three consecutive ranges:

        [lo, min(full_lo, hi))   masked: some entry is hidden (window edge),
        [full_lo, full_hi)       unmasked: every (query, key) pair of the block is visible,
        [full_hi, hi)            masked: window edge or the last, partial key block.

    ``lo``, ``full_lo``, ``full_hi`` are multiples of BLOCK_N; blocks outside [lo, hi) hold no
    visible key and are skipped. Integer divisions only see non-negative numbers (Triton's
    ``//`` truncates on the GPU but floors in the interpreter)."""
    off = len_k - len_q
    lo = m0 * 0
    hi = len_k + m0 * 0
    full_lo = lo
    full_hi = (len_k // BLOCK_N) * BLOCK_N
    if HAS_LEFT:
        lo = (tl.maximum(m0 + off - window_left, 0) // BLOCK_N) * BLOCK_N
        # a block is fully inside the left edge once its first key is seen by the block's last row
        full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 + off - window_left, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.maximum(full_lo, lo)
    if HAS_RIGHT:
        hi = tl.minimum(len_k, m0 + BLOCK_M + off + window_right)
        # ... and inside the right edge while its last key is seen by the block's first row
        full_hi = tl.minimum(full_hi, (tl.maximum(m0 + off + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    full_hi = tl.maximum(full_hi, full_lo)
    # int64 loop bounds: ``start * stride`` offsets in the loops then never overflow
    return lo.to(tl.int64), full_lo.to(tl.int64), full_hi.to(tl.int64), hi.to(tl.int64)


@triton.jit
def q_block_range(n0, len_q, len_k, window_left, window_right,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query blocks that see some key of ``[n0, n0 + BLOCK_N)``, split like `kv_block_range`:
    masked ``[lo, min(full_lo, hi))``, unmasked ``[full_lo, full_hi)``, masked ``[full_hi, hi)``.
    A partial last key block makes every query block masked."""
    off = len_k - len_q
    lo = n0 * 0
    hi = len_q + n0 * 0
    full_lo = lo
    full_hi = (len_q // BLOCK_M) * BLOCK_M
    if HAS_RIGHT:
        # query i sees key j only if j <= i + off + right, i.e. i >= j - off - right
        lo = (tl.maximum(n0 - off - window_right, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - off - window_right, 0), BLOCK_M) * BLOCK_M
        full_lo = tl.maximum(full_lo, lo)
    if HAS_LEFT:
        # ... and only if j >= i + off - left, i.e. i <= j - off + left
        hi = tl.minimum(len_q, n0 + BLOCK_N - off + window_left)
        full_hi = tl.minimum(full_hi, (tl.maximum(n0 - off + window_left + 1, 0) // BLOCK_M) * BLOCK_M)
    full_hi = tl.where(n0 + BLOCK_N <= len_k, full_hi, full_lo)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo.to(tl.int64), full_lo.to(tl.int64), full_hi.to(tl.int64), hi.to(tl.int64)


@triton.jit
def window_mask(offs_m, offs_n, len_q, len_k, window_left, window_right,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Bool [BM, BN]: query ``offs_m[:, None]`` sees key ``offs_n[None, :]`` (and both exist)."""
    diag = offs_m + (len_k - len_q)                                   # [BM] the key aligned with each row
    m_vis = (offs_m[:, None] < len_q) & (offs_n[None, :] < len_k)     # [BM, BN]
    if HAS_LEFT:
        m_vis = m_vis & (offs_n[None, :] >= diag[:, None] - window_left)
    if HAS_RIGHT:
        m_vis = m_vis & (offs_n[None, :] <= diag[:, None] + window_right)
    return m_vis


@triton.jit
def dropout_keep(seed, drop_row0, drop_col0, drop_stride, offs_m, offs_n, threshold):
    """Bool [BM, BN]: Philox draw of counter ``(drop_row0 + i) * drop_stride + drop_col0 + j``
    (int64), kept iff its top 24 bits are ``>= threshold`` (`pyattn.reference.dropout_keep_mask`)."""
    rows = (drop_row0 + offs_m).to(tl.int64) * drop_stride                          # [BM]
    b_off = rows[:, None] + (drop_col0 + offs_n).to(tl.int64)[None, :]               # [BM, BN]
    return (tl.randint(seed, b_off) >> 8).to(tl.int32) >= threshold
