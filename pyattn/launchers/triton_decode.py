"""Launcher of the Triton flash-decoding forward (``pyattn.kernels.softmax.decode``).

Softmax attention of a few queries (``Sq`` = 1..16) over many keys: the keys are
split into chunks that run in parallel, one program per (batch, kv head, row
block, chunk), and a second kernel merges the chunks with their log-sum-exps.
All query heads of a kv-head group and all queries share one tile of rows, so
K and V are read once per group. Semantics: ``shared/API.md`` section 1
(no dropout). This module only plans and launches: the op validated the inputs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..kernels.softmax.decode import decode_combine_kernel, decode_split_kernel

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 128
_MIN_BLOCKS_PER_SPLIT = 4   # below this the per-chunk prologue and the partial writes stop paying off
_INTERPRETER_SPLITS = 4     # on CPU (Triton interpreter) programs run one after another: a few chunks suffice


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@dataclass(frozen=True)
class DecodePlan:
    """Everything the launch decides from shapes, flags and the device.

    Keys [kv_start, kv_end) are those some row may see under causal/window
    (kv_start rounded down to a block); chunk `s` is
    [kv_start + s * chunk, kv_start + (s + 1) * chunk) clipped to kv_end. Every
    row sees every key of [full_lo, full_hi) (full_lo rounded up to a block).
    window_left / window_right: the per-row bounds with causal folded in and
    unbounded sides replaced by Sk + Sq (beyond every key of every row).
    """
    block_m: int
    block_n: int
    block_d: int
    block_dv: int
    num_m_blocks: int
    num_splits: int
    chunk: int
    kv_start: int
    kv_end: int
    full_lo: int
    full_hi: int
    window_left: int
    window_right: int
    num_warps: int
    num_stages: int
    precision: str

    @property
    def empty(self) -> bool:
        """No row can see any key: the output is zeros and lse -inf, no kernel runs."""
        return self.kv_end <= self.kv_start


def num_splits_for(work: int, num_blocks: int, sm_count: int) -> int:
    """Chunks per (batch, kv head, row block) on a GPU with `sm_count` SMs.

    `work` programs exist without splitting and each walks `num_blocks` key blocks.
    Split until about two programs per SM are in flight (enough loads in flight to
    saturate memory bandwidth), keeping at least _MIN_BLOCKS_PER_SPLIT blocks per chunk
    and at most _MAX_SPLITS chunks (the combine kernel holds one lse per chunk).
    """
    if work <= 0 or num_blocks <= 0:
        return 1
    want = _cdiv(2 * sm_count, work)
    return max(1, min(want, num_blocks // _MIN_BLOCKS_PER_SPLIT, _MAX_SPLITS))


def plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window_left: int,
         window_right: int, num_splits: Optional[int] = None) -> DecodePlan:
    """Block sizes, key range and chunking for these inputs (see `DecodePlan`)."""
    batch, heads_q, seq_q, dim = q.shape
    heads_kv, seq_k, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    on_gpu = q.device.type == "cuda"
    rows = (heads_q // heads_kv) * seq_q

    block_d, block_dv = max(16, _next_pow2(dim)), max(16, _next_pow2(dim_v))
    widest = max(block_d, block_dv)
    wide = q.dtype == torch.float32 or widest > 128   # tiles of twice the registers and shared memory
    # Register budget: a [BLOCK_M, widest] fp32 accumulator and q tile per program.
    max_m = (128 if widest <= 64 else 64 if widest <= 128 else 32) // (2 if q.dtype == torch.float32 else 1)
    block_m = min(max(16, _next_pow2(rows)), max(16, max_m))
    block_n = 32 if wide and on_gpu else 64
    num_m_blocks = _cdiv(rows, block_m)

    unbounded = seq_k + seq_q
    left = unbounded if window_left < 0 else min(window_left, unbounded)
    right = unbounded if window_right < 0 else min(window_right, unbounded)
    if causal:
        right = min(right, 0)
    off = seq_k - seq_q
    kv_start = max(0, off - left)                        # first key of row 0
    kv_end = min(seq_k, (seq_q - 1) + off + right + 1)   # one past the last key of the last row
    full_lo = max(0, (seq_q - 1) + off - left)           # first key of the last row
    full_hi = min(seq_k, off + right + 1)                # one past the last key of row 0
    if kv_end <= kv_start:                               # no row sees a key (Sk = 0)
        kv_start = kv_end = 0
    kv_start = (kv_start // block_n) * block_n
    full_lo = _cdiv(full_lo, block_n) * block_n

    num_blocks = _cdiv(max(kv_end - kv_start, 0), block_n)
    if num_splits is None:
        if on_gpu:
            device = q.device.index if q.device.index is not None else torch.cuda.current_device()
            num_splits = num_splits_for(batch * heads_kv * num_m_blocks, num_blocks, _sm_count(device))
        else:
            num_splits = _INTERPRETER_SPLITS
    num_splits = max(1, min(num_splits, num_blocks, _MAX_SPLITS))
    chunk_blocks = max(1, _cdiv(num_blocks, num_splits))
    num_splits = max(1, _cdiv(num_blocks, chunk_blocks))  # no chunk left empty
    return DecodePlan(block_m=block_m, block_n=block_n, block_d=block_d, block_dv=block_dv,
                      num_m_blocks=num_m_blocks, num_splits=num_splits, chunk=chunk_blocks * block_n,
                      kv_start=kv_start, kv_end=kv_end, full_lo=full_lo, full_hi=full_hi,
                      window_left=left, window_right=right,
                      # 8 warps from a 32 x 128 tile up keeps the accumulator, scores and bias out of local memory
                      num_warps=8 if block_m * widest >= 32 * 128 else 4,
                      num_stages=2 if wide else 3,
                      # float32: 3xTF32 on tensor cores, about float32's accuracy ("ieee" runs on FMA units and spills)
                      precision="tf32x3" if q.dtype == torch.float32 else "tf32")


def _bias_strides(bias: torch.Tensor) -> Tuple[int, int, int, int]:
    """Element strides of a 4-D bias, 0 along size-1 (broadcast) dims."""
    return tuple(0 if size == 1 else stride for size, stride in zip(bias.shape, bias.stride()))


def attention_decode_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor],
                             *, scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
                             num_splits: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flash-decoding forward; returns ``out`` (B, Hq, Sq, Dv) in q's dtype and ``lse`` float32 (B, Hq, Sq).

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv): one dtype (float32,
    float16, bfloat16), one device (CUDA, or CPU under the Triton interpreter), any
    strides, ``Hq % Hkv == 0``. ``attn_bias``: None or 4-D ``(B|1, Hq|1, Sq|1, Sk|1)``,
    float (q's dtype or float32) added to the scores, or bool (True = keep).
    ``window_left/right``: -1 unbounded. ``softcap``: 0 disables. Meant for small Sq
    (1..16; any Sq is correct). ``num_splits``: force the number of key chunks
    (None: chosen from Sk, B * Hkv and the SM count). Rows that see no key give
    zeros and lse -inf.
    """
    batch, heads_q, seq_q, dim = q.shape
    heads_kv, dim_v = k.shape[1], v.shape[-1]
    out = torch.empty((batch, heads_q, seq_q, dim_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, seq_q), dtype=torch.float32, device=q.device)
    if lse.numel() == 0:
        return out, lse
    p = plan(q, k, v, causal=causal, window_left=window_left, window_right=window_right, num_splits=num_splits)
    if p.empty:
        return out.zero_(), lse.fill_(float("-inf"))

    if p.num_splits == 1:   # the split kernel writes the final result
        o_dst, lse_dst = out, lse
        o_strides = (*out.stride()[:3], 0, out.stride(3))
        lse_strides = (*lse.stride(), 0)
    else:
        o_dst = torch.empty((batch, heads_q, seq_q, p.num_splits, dim_v), dtype=torch.float32, device=q.device)
        lse_dst = torch.empty((batch, heads_q, seq_q, p.num_splits), dtype=torch.float32, device=q.device)
        o_strides, lse_strides = o_dst.stride(), lse_dst.stride()

    if attn_bias is None:
        bias, bias_kind, bias_strides = q, 0, (0, 0, 0, 0)   # never read
    elif attn_bias.dtype == torch.bool:
        bias, bias_kind, bias_strides = attn_bias.view(torch.uint8), 2, _bias_strides(attn_bias)
    else:
        bias, bias_kind, bias_strides = attn_bias, 1, _bias_strides(attn_bias)

    if softcap > 0:
        qk_scale, softcap2 = 2.0 * _LOG2E * scale / softcap, _LOG2E * softcap
    else:
        qk_scale, softcap2 = _LOG2E * scale, 0.0
    interpreting = q.device.type != "cuda"
    grid = (batch * heads_kv * p.num_splits * p.num_m_blocks,)
    decode_split_kernel[grid](
        q, k, v, bias, o_dst, lse_dst,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, *o_strides, *lse_strides,
        heads_kv, heads_q // heads_kv, seq_q, p.num_splits, p.num_m_blocks,
        qk_scale, softcap2, k.shape[2] - seq_q, p.window_left, p.window_right,
        p.kv_start, p.kv_end, p.chunk, p.full_lo, p.full_hi,
        HEAD_DIM=dim, HEAD_DIM_V=dim_v, BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_D=p.block_d,
        BLOCK_DV=p.block_dv, BIAS_KIND=bias_kind, HAS_SOFTCAP=softcap > 0,
        # The interpreter multiplies bf16 bit patterns in tl.dot (triton#11584): upcast there.
        DOT_FP32=interpreting and q.dtype == torch.bfloat16,
        PRECISION=p.precision,
        num_warps=p.num_warps, num_stages=p.num_stages)

    if p.num_splits > 1:
        block_s = _next_pow2(p.num_splits)
        block_dv = min(p.block_dv, max(16, 8192 // block_s))
        # One row per program on a GPU (many programs in flight); the interpreter pays per program.
        block_r = 1 if not interpreting else max(1, 8192 // (block_s * block_dv))
        rows = batch * heads_q * seq_q
        decode_combine_kernel[(_cdiv(rows, block_r), _cdiv(dim_v, block_dv))](
            o_dst, lse_dst, out, lse, rows, p.num_splits, HEAD_DIM_V=dim_v, BLOCK_R=block_r, BLOCK_S=block_s,
            BLOCK_DV=block_dv, num_warps=4)
    return out, lse
