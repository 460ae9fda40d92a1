"""Launcher of the Triton fused softmax attention kernels (``pyattn.kernels.softmax``).

It turns the validated tensors and flags into kernel arguments in one place: strides
(size-1 broadcast dims of the bias get stride 0), the log2-domain constants, the
constexpr switches, the grid, and the block configuration -- one fixed configuration
under the Triton interpreter (CPU tensors), a few autotuned ones per head-dim bucket on a
GPU, keyed on bucketed shapes (never the raw sequence length).

Layouts: dense q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), out (B, Hq, Sq, Dv),
lse (B, Hq, Sq); varlen q (total_q, Hq, D), k/v (total_k, Hkv, D|Dv), out (total_q, Hq, Dv),
lse (Hq, total_q). Any strides. Callers allocate every output; launchers never validate.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import torch

from ..reference import dropout_threshold

_LOG2E = 1.4426950408889634
# tl.dot input precision per input dtype: on the GPU float32 would use TF32 by default; "ieee" keeps
# float32 inputs exact to float32. float16/bfloat16 dots are native whatever this says.
_PRECISION = {torch.float32: "ieee", torch.float16: "tf32", torch.bfloat16: "tf32"}
# Under the interpreter (and the CI): 64-blocks, the size the interpreter runs fastest on.
_INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64)
_TUNE_KEYS = ["D", "DV", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "BIAS_KIND", "HAS_DROPOUT", "IS_VARLEN",
              "tune_bucket"]

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head-dim bucket (the padded max(D, Dv)).
# Forward and dQ: BLOCK_M query rows per program; dK/dV: BLOCK_N keys per program.
_GPU_CONFIGS: Dict[str, Dict[int, List[Tuple[int, int, int, int]]]] = {
    "forward": {64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
                128: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
                256: [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)]},
    "dkdv": {64: [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2)],
             128: [(32, 128, 8, 2), (32, 64, 4, 3), (64, 64, 8, 2)],
             256: [(16, 64, 4, 2), (32, 64, 8, 1), (32, 32, 4, 2)]},
    "dq": {64: [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2)],
           128: [(128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 8, 2)],
           256: [(64, 16, 4, 2), (64, 32, 8, 1), (32, 32, 4, 2)]},
}


def _kernels():
    # Imported on first use: importing pyattn imports no Triton.
    from pyattn.kernels.softmax import backward, forward

    return forward, backward


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block(dim: int) -> int:
    """A block's width for a head dim: the next power of two (tl.arange), at least 16 (tl.dot)."""
    return max(16, _next_pow2(dim))


def _head_bucket(block_d: int, block_dv: int) -> int:
    width = max(block_d, block_dv)
    return 64 if width <= 64 else 128 if width <= 128 else 256


def _tune_bucket(seq_q: int, seq_k: int) -> int:
    """Autotune key: the longer sequence, rounded up to a power of two in [128, 16384]."""
    return min(16384, max(128, _next_pow2(max(seq_q, seq_k))))


@functools.lru_cache(maxsize=None)
def _autotuned(name: str, head_bucket: int):
    import triton

    forward, backward = _kernels()
    kernel = {"forward": forward.attention_forward_kernel, "dkdv": backward.attention_backward_dkdv_kernel,
              "dq": backward.attention_backward_dq_kernel}[name]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in _GPU_CONFIGS[name][head_bucket]]
    keys = _TUNE_KEYS + (["STORE_DS"] if name == "dq" else [])
    return triton.autotune(configs=configs, key=keys)(kernel)


def _launch(name: str, kernel, grid_rows: int, block_key: str, heads: int, batch: int, args: tuple,
            consts: dict, config: Optional[dict]) -> None:
    """Runs `kernel` over grid ``(cdiv(grid_rows, block), heads, batch)``: with `config` (a dict with
    BLOCK_M, BLOCK_N and optionally num_warps / num_stages) or under the interpreter with a
    fixed configuration, else autotuned."""
    if grid_rows == 0 or heads == 0 or batch == 0:
        return
    interpret = not args[0].is_cuda
    if config is None and interpret:
        config = _INTERPRETER_CONFIG
    if config is not None:
        config = dict(config)
        launch_opts = {k: config.pop(k) for k in ("num_warps", "num_stages") if k in config}
        grid = (_cdiv(grid_rows, config[block_key]), heads, batch)
        kernel[grid](*args, **consts, **config, **launch_opts)
        return
    tuned = _autotuned(name, _head_bucket(consts["BLOCK_D"], consts["BLOCK_DV"]))
    tuned[lambda meta: (_cdiv(grid_rows, meta[block_key]), heads, batch)](*args, **consts)


def _bias_args(bias: Optional[torch.Tensor], anchor: torch.Tensor):
    """(pointer tensor, 4 strides, BIAS_KIND): size-1 dims broadcast through stride 0; bool as uint8."""
    if bias is None:
        return anchor, (0, 0, 0, 0), 0
    strides = tuple(0 if n == 1 else s for n, s in zip(bias.shape, bias.stride()))
    if bias.dtype == torch.bool:
        return bias.view(torch.uint8), strides, 2
    return bias, strides, 1


def _flag_args(*, scale, causal, window_left, window_right, softcap, dropout_p, d, dv, varlen, interpret,
               dtype) -> Tuple[tuple, dict]:
    """Scalar kernel arguments (scale, qk_scale, cap_scale, cap_out, left, right, threshold, drop_scale)
    and the constexprs every kernel shares."""
    right = 0 if causal else window_right  # causal = the window's right edge at the diagonal
    has_cap = softcap > 0
    scalars = (float(scale), float(scale) * _LOG2E,
               2.0 * _LOG2E * float(scale) / softcap if has_cap else 0.0,
               float(softcap) * _LOG2E if has_cap else 0.0,
               int(window_left), int(max(right, 0)),
               dropout_threshold(dropout_p) if dropout_p > 0 else 0,
               1.0 / (1.0 - dropout_p))
    consts = dict(D=d, DV=dv, BLOCK_D=_block(d), BLOCK_DV=_block(dv), HAS_LEFT=window_left >= 0,
                  HAS_RIGHT=right >= 0, HAS_SOFTCAP=has_cap, HAS_DROPOUT=dropout_p > 0, IS_VARLEN=varlen,
                  # the interpreter multiplies bfloat16 bit patterns in tl.dot (triton#11584): upcast there
                  DOT_FP32=interpret and dtype == torch.bfloat16, PRECISION=_PRECISION[dtype])
    return scalars, consts


def _thd(x: torch.Tensor) -> Tuple[int, int, int, int]:
    """Strides (b, h, s, d) of a packed (total, H, D) tensor, batch stride 0."""
    return (0, x.stride(1), x.stride(0), x.stride(2))


def _seed(seed: Optional[torch.Tensor], anchor: torch.Tensor) -> torch.Tensor:
    if seed is None:
        return anchor
    # the kernel loads the seed itself: copy it to the device (no host sync), never read it here
    return seed.to(anchor.device, non_blocking=True) if seed.device != anchor.device else seed


# --------------------------------------------------------------------------- forward

def _forward(q, k, v, bias, seed, out, lse, cu_q, cu_k, strides, seqs, batch, max_q, max_k, params, config):
    forward, _ = _kernels()
    hq, hkv = q.shape[1], k.shape[1]
    interpret = not q.is_cuda
    scalars, consts = _flag_args(d=q.shape[-1], dv=v.shape[-1], varlen=cu_q is not None, interpret=interpret,
                                 dtype=q.dtype, **params)
    scale, qk_scale, cap_scale, cap_out, left, right, threshold, drop_scale = scalars
    bias_ptr, bias_strides, bias_kind = _bias_args(bias, q)
    consts["BIAS_KIND"] = bias_kind
    cu_q = q if cu_q is None else cu_q
    cu_k = q if cu_k is None else cu_k
    args = (q, k, v, bias_ptr, _seed(seed, q), out, lse, cu_q, cu_k,
            *strides["q"], *strides["k"], *strides["v"], *bias_strides, *strides["out"], *strides["lse"],
            hq, hq // hkv, *seqs, qk_scale, cap_scale, cap_out, left, right, threshold, drop_scale,
            _tune_bucket(max_q, max_k))
    _launch("forward", forward.attention_forward_kernel, max_q, "BLOCK_M", hq, batch, args, consts, config)


def softmax_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor],
                    dropout_seed: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, *, scale: float,
                    causal: bool, window_left: int, window_right: int, softcap: float, dropout_p: float,
                    config: Optional[dict] = None) -> None:
    """Writes ``out`` (B, Hq, Sq, Dv) and float32 ``lse`` (B, Hq, Sq) in place.

    ``attn_bias``: None or a 4-D (B|1, Hq|1, Sq|1, Sk|1) float (any float dtype) or bool tensor.
    ``dropout_seed``: int64 scalar tensor (read by the kernel) when ``dropout_p > 0``.
    ``config``: force block sizes (``dict(BLOCK_M=.., BLOCK_N=..)``), for tests.
    Semantics: ``shared/API.md`` section 1 (``pyattn.reference.attention``)."""
    batch, _, seq_q, _ = q.shape
    seq_k = k.shape[2]
    if batch == 0 or seq_q == 0:
        return
    strides = dict(q=q.stride(), k=k.stride(), v=v.stride(), out=out.stride(), lse=lse.stride())
    _forward(q, k, v, attn_bias, dropout_seed, out, lse, None, None, strides, (seq_q, seq_k), batch, seq_q, seq_k,
             dict(scale=scale, causal=causal, window_left=window_left, window_right=window_right, softcap=softcap,
                  dropout_p=dropout_p), config)


def _fill_rows_after(x: torch.Tensor, cu: torch.Tensor, total: int, heads: int, stride_r: int, stride_h: int,
                     stride_c: int, cols: int, value: float) -> None:
    """Rows ``[cu[-1], total)`` of a packed tensor (total, heads, cols) belong to no sequence: fill them
    with `value` on the device (how many there are is only known there)."""
    if total == 0 or heads == 0:
        return
    forward, _ = _kernels()
    block_r = 16
    programs = min(_cdiv(total, block_r), 8 if not x.is_cuda else 128)
    forward.fill_tail_kernel[(programs, heads)](x, cu, cu.shape[0] - 1, total, stride_r, stride_h, stride_c,
                                                float(value), NUM_COLS=cols, BLOCK_R=block_r,
                                                BLOCK_C=_block(cols))


def softmax_varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_seed: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, *,
                           scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
                           dropout_p: float, config: Optional[dict] = None) -> None:
    """Writes ``out`` (total_q, Hq, Dv) and float32 ``lse`` (Hq, total_q) in place; rows past
    ``cu_seqlens_q[-1]`` get zeros and ``-inf``. ``cu_seqlens_*`` int32 (batch + 1,) on q's device."""
    total_q, hq = q.shape[0], q.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    strides = dict(q=_thd(q), k=_thd(k), v=_thd(v), out=_thd(out), lse=(0, lse.stride(0), lse.stride(1)))
    if batch > 0 and max_seqlen_q > 0:
        _forward(q, k, v, None, dropout_seed, out, lse, cu_seqlens_q, cu_seqlens_k, strides,
                 (total_q, k.shape[0]), batch, max_seqlen_q, max_seqlen_k,
                 dict(scale=scale, causal=causal, window_left=window_left, window_right=window_right,
                      softcap=softcap, dropout_p=dropout_p), config)
    _fill_rows_after(out, cu_seqlens_q, total_q, hq, out.stride(0), out.stride(1), out.stride(2), out.shape[2], 0.0)
    _fill_rows_after(lse, cu_seqlens_q, total_q, hq, lse.stride(1), lse.stride(0), 0, 1, float("-inf"))


# --------------------------------------------------------------------------- backward

def _backward(dout, dlse, q, k, v, bias, seed, out, lse, dq, dk, dv, dbias, cu_q, cu_k, strides, seqs, batch,
              max_q, max_k, params, config):
    _, backward = _kernels()
    varlen = cu_q is not None
    hq, hkv = q.shape[1], k.shape[1]
    interpret = not q.is_cuda
    scalars, consts = _flag_args(d=q.shape[-1], dv=v.shape[-1], varlen=varlen, interpret=interpret, dtype=q.dtype,
                                 **params)
    bias_ptr, bias_strides, bias_kind = _bias_args(bias, q)
    consts["BIAS_KIND"] = bias_kind
    seed = _seed(seed, q)
    cu_q = q if cu_q is None else cu_q
    cu_k = q if cu_k is None else cu_k
    tune_bucket = _tune_bucket(max_q, max_k)

    # delta = rowsum(dO * O) - dlse, over (B, H, S) views (varlen: (1, H, total_q)).
    delta = torch.empty_like(lse)
    if varlen:
        o4, do4 = out.transpose(0, 1)[None], dout.transpose(0, 1)[None]
        dl3, de3 = dlse[None], delta[None]
    else:
        o4, do4, dl3, de3 = out, dout, dlse, delta
    block_pre = 64
    backward.attention_backward_preprocess_kernel[(_cdiv(o4.shape[2], block_pre), o4.shape[1], o4.shape[0])](
        o4, do4, dl3, de3, *o4.stride(), *do4.stride(), *dl3.stride(), *de3.stride(), o4.shape[2],
        DV=v.shape[-1], BLOCK_DV=_block(v.shape[-1]), BLOCK_M=block_pre)

    common = (*strides["q"], *strides["k"], *strides["v"], *bias_strides, *strides["dout"], *strides["lse"])
    tail = (hq, hq // hkv, *seqs, *scalars, tune_bucket)
    if dk is not None or dv is not None:
        # the kernel writes both: a gradient nobody asked for goes to a scratch buffer
        dk_ = dk if dk is not None else torch.empty_like(k)
        dv_ = dv if dv is not None else torch.empty_like(v)
        sk = strides["dk"] if dk is not None else (_thd(dk_) if varlen else dk_.stride())
        sv = strides["dv"] if dv is not None else (_thd(dv_) if varlen else dv_.stride())
        args = (q, k, v, bias_ptr, seed, dout, lse, delta, dk_, dv_, cu_q, cu_k, *common, *sk, *sv, *tail)
        _launch("dkdv", backward.attention_backward_dkdv_kernel, max_k, "BLOCK_N", hkv, batch, args, consts, config)
    if dq is not None or dbias is not None:
        dq_ = dq if dq is not None else torch.empty_like(q)
        sq = strides["dq"] if dq is not None else (_thd(dq_) if varlen else dq_.stride())
        args = (q, k, v, bias_ptr, seed, dout, lse, delta, dq_, q if dbias is None else dbias, cu_q, cu_k, *common,
                *sq, *tail)
        _launch("dq", backward.attention_backward_dq_kernel, max_q, "BLOCK_M", hq, batch, args,
                dict(consts, STORE_DS=dbias is not None), config)


def softmax_backward(dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     attn_bias: Optional[torch.Tensor], dropout_seed: Optional[torch.Tensor], out: torch.Tensor,
                     lse: torch.Tensor, dq: Optional[torch.Tensor], dk: Optional[torch.Tensor],
                     dv: Optional[torch.Tensor], dbias_full: Optional[torch.Tensor], *, scale: float, causal: bool,
                     window_left: int, window_right: int, softcap: float, dropout_p: float,
                     config: Optional[dict] = None) -> None:
    """Writes the gradients that are not None in place: ``dq``, ``dk``, ``dv`` (the inputs' shapes,
    any strides) and ``dbias_full``, a contiguous float32 (B, Hq, Sq, Sk) buffer of zeros that
    receives the gradient of the logits (the caller sums it to the bias's shape).

    ``dout`` (B, Hq, Sq, Dv) and ``dlse`` (B, Hq, Sq) are the gradients of out and lse; ``out`` and
    ``lse`` are the forward's results; the rest as in `softmax_forward`."""
    batch, _, seq_q, _ = q.shape
    seq_k = k.shape[2]
    if batch == 0:
        return
    if seq_q == 0 or seq_k == 0:  # no score at all: every gradient is zero
        for g in (dq, dk, dv):
            if g is not None:
                g.zero_()
        return
    strides = dict(q=q.stride(), k=k.stride(), v=v.stride(), dout=dout.stride(), lse=lse.stride(),
                   dq=None if dq is None else dq.stride(), dk=None if dk is None else dk.stride(),
                   dv=None if dv is None else dv.stride())
    _backward(dout, dlse, q, k, v, attn_bias, dropout_seed, out, lse, dq, dk, dv, dbias_full, None, None, strides,
              (seq_q, seq_k), batch, seq_q, seq_k,
              dict(scale=scale, causal=causal, window_left=window_left, window_right=window_right, softcap=softcap,
                   dropout_p=dropout_p), config)


def softmax_varlen_backward(dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                            max_seqlen_q: int, max_seqlen_k: int, dropout_seed: Optional[torch.Tensor],
                            out: torch.Tensor, lse: torch.Tensor, dq: Optional[torch.Tensor],
                            dk: Optional[torch.Tensor], dv: Optional[torch.Tensor], *, scale: float, causal: bool,
                            window_left: int, window_right: int, softcap: float, dropout_p: float,
                            config: Optional[dict] = None) -> None:
    """Varlen `softmax_backward`: ``dout`` (total_q, Hq, Dv), ``dlse`` (Hq, total_q); rows past
    ``cu_seqlens_*[-1]`` get zero gradients."""
    batch = cu_seqlens_q.shape[0] - 1
    strides = dict(q=_thd(q), k=_thd(k), v=_thd(v), dout=_thd(dout), lse=(0, lse.stride(0), lse.stride(1)),
                   dq=None if dq is None else _thd(dq), dk=None if dk is None else _thd(dk),
                   dv=None if dv is None else _thd(dv))
    if batch > 0 and (max_seqlen_q > 0 or max_seqlen_k > 0):
        _backward(dout, dlse, q, k, v, None, dropout_seed, out, lse, dq, dk, dv, None, cu_seqlens_q, cu_seqlens_k,
                  strides, (q.shape[0], k.shape[0]), batch, max_seqlen_q, max_seqlen_k,
                  dict(scale=scale, causal=causal, window_left=window_left, window_right=window_right,
                       softcap=softcap, dropout_p=dropout_p), config)
    # rows of no sequence (with no sequence at all, or only empty ones: every row) get zero gradients
    for g, cu in ((dq, cu_seqlens_q), (dk, cu_seqlens_k), (dv, cu_seqlens_k)):
        if g is not None:
            _fill_rows_after(g, cu, g.shape[0], g.shape[1], g.stride(0), g.stride(1), g.stride(2), g.shape[2], 0.0)
