"""Pieces the linear attention kernels share: the fused feature maps, the in-chunk decay.

Decay inside a chunk: with ``b_i = g_{t0} + ... + g_i`` the cumulative log decay from the chunk's
first token to token i (float32, ``<= 0``), every weight a kernel needs is an exponent of a
difference that is ``<= 0``, so none can overflow:

    exp(b_i)            state before the chunk -> token i
    exp(b_i - b_j)      token j -> token i, j <= i
    exp(b_last - b_j)   token j -> state after the chunk
"""
import triton
import triton.language as tl

# Globals a kernel reads must be constexpr instances (an annotation is not enough on the GPU).
FMAP_IDENTITY = tl.constexpr(0)
FMAP_ELU = tl.constexpr(1)   # elu(x) + 1
FMAP_RELU = tl.constexpr(2)


@triton.jit
def feature_map(x, FMAP: tl.constexpr):
    """``f(x)`` in float32: ``x``, ``elu(x) + 1`` or ``relu(x)``."""
    x = x.to(tl.float32)
    y = x
    if FMAP == FMAP_ELU:
        y = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FMAP == FMAP_RELU:
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def feature_map_grad(x, FMAP: tl.constexpr):
    """``f'(x)`` in float32 (relu' and elu' at 0 as torch takes them: 0 and 1)."""
    x = x.to(tl.float32)
    d = x * 0.0 + 1.0
    if FMAP == FMAP_ELU:
        d = tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FMAP == FMAP_RELU:
        d = tl.where(x > 0, 1.0, 0.0)
    return d


@triton.jit
def load_features(p, mask, scale, FMAP: tl.constexpr):
    """``f(x) * scale`` of a block of raw q or k (float32), 0 where `mask` is False: padding rows
    and feature columns must add nothing to a state (``elu(0) + 1 = 1``)."""
    x = tl.load(p, mask=mask, other=0.0)
    return tl.where(mask, feature_map(x, FMAP) * scale, 0.0)


@triton.jit
def chunk_decay(p_g, offs_t, m_t, stride_gt, HAS_DECAY: tl.constexpr):
    """(b [BT], b_last): the in-chunk cumulative log decay and its value at the chunk's end
    (padding tokens add 0, so ``b_last`` is b of the last real token). Zeros without decay."""
    b_b = tl.zeros(offs_t.shape, dtype=tl.float32)
    b_last = tl.sum(b_b, 0)
    if HAS_DECAY:
        b_g = tl.load(p_g + offs_t.to(tl.int64) * stride_gt, mask=m_t, other=0.0).to(tl.float32)
        b_b = tl.cumsum(b_g, 0)
        b_last = tl.sum(b_g, 0)
    return b_b, b_last


@triton.jit
def causal_weights(b_b, offs_c, HAS_DECAY: tl.constexpr):
    """[BT, BT] weights of token j (column) in token i (row): ``exp(b_i - b_j)`` for ``j <= i``,
    else 0 (1 on and below the diagonal without decay)."""
    m_ij = offs_c[:, None] >= offs_c[None, :]
    if HAS_DECAY:
        w = tl.exp(tl.where(m_ij, b_b[:, None] - b_b[None, :], float("-inf")))
    else:
        w = tl.where(m_ij, 1.0, 0.0)
    return w


@triton.jit
def to_dot(x, PTR, DOT_FP32: tl.constexpr):
    """`x` as an operand of an intra-chunk ``tl.dot``: the inputs' dtype (tensor cores), or float32
    under the interpreter for bfloat16, whose ``tl.dot`` multiplies bit patterns (triton#11584)."""
    if DOT_FP32:
        y = x.to(tl.float32)
    else:
        y = x.to(PTR.dtype.element_ty)
    return y
