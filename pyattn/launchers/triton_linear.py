"""Launcher of the Triton linear attention kernels (``pyattn.kernels.linear``).

It turns the validated tensors and flags into kernel arguments in one place: strides, the
constexpr switches, block sizes (computed, not autotuned: one configuration on a GPU, a smaller one
under the interpreter so that short test inputs still span several chunks and feature/value
blocks), the scratch buffers of per-chunk states, and the sums PyTorch does after the kernels
(GQA groups of dk/dv, feature blocks and the reverse cumulative sum of the log-decay gradient).

Layouts: q (B, Hq, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), log decay (B, Hq, S) (stride 0
allowed), states S (B, Hq, D, Dv) / z (B, Hq, D) float32; ``D`` is the feature dim (the map
already applied when it is not fused). Any strides; the states it writes are contiguous.
Callers allocate every output; launchers never validate.
"""
from __future__ import annotations

from typing import Optional

import torch

# Forward inputs this short (and the decoding step) run the fused token loop.
RECURRENT_MAX_SEQ = 16
_GPU_CONFIG = dict(BT=64, BK=64, BV=64, num_warps=4)
# Under the interpreter (and the CI): 32-blocks, so small tests cross chunk, feature and value blocks.
_INTERPRETER_CONFIG = dict(BT=32, BK=32, BV=32)
_RECURRENT_BV = 32
_FMAPS = {"identity": 0, "elu": 1, "relu": 2}
# State products take float32 operands: "ieee" keeps float32 inputs exact, TF32 is enough for half inputs.
_PRECISION = {torch.float32: "ieee", torch.float16: "tf32", torch.bfloat16: "tf32"}


def _kernels():
    # Imported on first use: importing pyattn imports no Triton.
    from pyattn.kernels.linear import chunk_grad, chunk_output, chunk_state, recurrent

    return chunk_state, chunk_output, chunk_grad, recurrent


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block(dim: int) -> int:
    """A block's width for a dim: the next power of two (tl.arange), at least 16 (tl.dot)."""
    return max(16, 1 << max(0, (int(dim) - 1).bit_length()))


def _config(q: torch.Tensor, v: torch.Tensor, config: Optional[dict]) -> dict:
    """Block sizes (and launch options), no wider than the padded feature / value dims."""
    config = dict(config or (_GPU_CONFIG if q.is_cuda else _INTERPRETER_CONFIG))
    config["BK"] = min(config["BK"], _block(q.shape[-1]))
    config["BV"] = min(config["BV"], _block(v.shape[-1]))
    return config


def _consts(q, v, feature_map, causal, decay, normalize) -> dict:
    return dict(F=q.shape[-1], DV=v.shape[-1], FMAP=_FMAPS[feature_map], CAUSAL=bool(causal),
                HAS_DECAY=decay is not None, NORMALIZE=bool(normalize))


def _dot_consts(q) -> dict:
    # the interpreter multiplies bfloat16 bit patterns in tl.dot (triton#11584): upcast there
    return dict(DOT_FP32=(not q.is_cuda) and q.dtype == torch.bfloat16, PRECISION=_PRECISION[q.dtype])


def _strides(x: Optional[torch.Tensor], ndim: int):
    return (0,) * ndim if x is None else tuple(x.stride())


def _launch_opts(config: dict) -> dict:
    return {k: config[k] for k in ("num_warps", "num_stages") if k in config}


def _blocks(config: dict) -> dict:
    return {k: config[k] for k in ("BT", "BK", "BV")}


def _state_forward(q, k, v, g, s0, z0, h, hz, s_out, z_out, consts, config):
    """Runs the forward state scan: per-chunk states into h / hz (causal), the final one into s_out / z_out."""
    chunk_state, _, _, _ = _kernels()
    b, hq, seq, f = q.shape
    dv, hkv = v.shape[-1], k.shape[1]
    num_chunks = _cdiv(seq, config["BT"])
    grid = (_cdiv(f, config["BK"]), _cdiv(dv, config["BV"]), b * hq)
    chunk_state.chunk_state_forward_kernel[grid](
        k, v, q if g is None else g, q if s0 is None else s0, q if z0 is None else z0,
        s_out if h is None else h, z_out if hz is None else hz, s_out, z_out,
        *k.stride(), *v.stride(), *_strides(g, 3), *_strides(s0, 4), *_strides(z0, 3),
        hq, hq // hkv, seq, num_chunks,
        F=consts["F"], DV=consts["DV"], FMAP=consts["FMAP"], CAUSAL=consts["CAUSAL"], HAS_DECAY=consts["HAS_DECAY"],
        HAS_INITIAL=s0 is not None, **_dot_consts(q), **_blocks(config), **_launch_opts(config))


def _copy_state(s0, z0, s_out, z_out):
    if s0 is None:
        s_out.zero_()
        z_out.zero_()
    else:
        s_out.copy_(s0)
        z_out.copy_(z0)


# --------------------------------------------------------------------------- forward

def linear_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                   state_s: Optional[torch.Tensor], state_z: Optional[torch.Tensor], out: torch.Tensor,
                   s_out: torch.Tensor, z_out: torch.Tensor, *, causal: bool, feature_map: str, normalize: bool,
                   scale: float, eps: float, recurrent: Optional[bool] = None, config: Optional[dict] = None) -> None:
    """Writes ``out`` (B, Hq, S, Dv) and the final state ``s_out`` (B, Hq, D, Dv) / ``z_out``
    (B, Hq, D) (contiguous float32) in place.

    ``feature_map``: "identity", "elu" or "relu", applied in the kernels. ``recurrent``: force the
    fused token loop (True) or the chunked kernels (False); None picks the loop for
    ``S <= RECURRENT_MAX_SEQ``. ``config``: block sizes ``dict(BT=.., BK=.., BV=..)``, for tests."""
    b, hq, seq, f = q.shape
    dv = v.shape[-1]
    if b * hq == 0:
        return
    if seq == 0:
        _copy_state(state_s, state_z, s_out, z_out)
        return
    consts = _consts(q, v, feature_map, causal, log_decay, normalize)
    if recurrent is None:
        recurrent = seq <= RECURRENT_MAX_SEQ
    if recurrent:
        _, _, _, rec = _kernels()
        bv = min(_RECURRENT_BV, _block(dv))
        rec.recurrent_forward_kernel[(_cdiv(dv, bv), b * hq)](
            q, k, v, q if log_decay is None else log_decay, q if state_s is None else state_s,
            q if state_z is None else state_z, out, s_out, z_out,
            *q.stride(), *k.stride(), *v.stride(), *_strides(log_decay, 3), *_strides(state_s, 4),
            *_strides(state_z, 3), *out.stride(), hq, hq // k.shape[1], seq, float(scale), float(eps),
            HAS_INITIAL=state_s is not None, BF=_block(f), BV=bv, **consts)
        return

    _, chunk_output, _, _ = _kernels()
    config = _config(q, v, config)
    num_chunks = _cdiv(seq, config["BT"])
    if causal:
        h = torch.empty(b * hq, num_chunks, f, dv, dtype=torch.float32, device=q.device)
        hz = torch.empty(b * hq, num_chunks, f, dtype=torch.float32, device=q.device)
        h_strides = (num_chunks * f * dv, f * dv, num_chunks * f, f)
    else:  # every chunk reads the one total state
        h, hz = None, None
        h_strides = (f * dv, 0, f, 0)
    _state_forward(q, k, v, log_decay, state_s, state_z, h, hz, s_out, z_out, consts, config)
    grid = (_cdiv(dv, config["BV"]), num_chunks, b * hq)
    chunk_output.chunk_output_kernel[grid](
        q, k, v, q if log_decay is None else log_decay, s_out if h is None else h, z_out if hz is None else hz, out,
        *q.stride(), *k.stride(), *v.stride(), *_strides(log_decay, 3), *out.stride(), *h_strides,
        hq, hq // k.shape[1], seq, float(scale), float(eps),
        **consts, **_dot_consts(q), **_blocks(config), **_launch_opts(config))


# --------------------------------------------------------------------------- backward

def _group_sum(x: torch.Tensor, target: torch.Tensor) -> None:
    """target (B, Hkv, S, X) <- x (B, Hq, S, X) summed over each kv head's query heads."""
    b, hq, seq, d = x.shape
    hkv = target.shape[1]
    target.copy_(x.view(b, hkv, hq // hkv, seq, d).sum(2))


def linear_backward(dout: torch.Tensor, ds_final: Optional[torch.Tensor], dz_final: Optional[torch.Tensor],
                    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                    state_s: Optional[torch.Tensor], state_z: Optional[torch.Tensor], out: torch.Tensor,
                    s_final: torch.Tensor, z_final: torch.Tensor, dq: Optional[torch.Tensor],
                    dk: Optional[torch.Tensor], dv: Optional[torch.Tensor], dlog_decay: Optional[torch.Tensor],
                    ds0: Optional[torch.Tensor], dz0: Optional[torch.Tensor], *, causal: bool, feature_map: str,
                    normalize: bool, scale: float, eps: float, config: Optional[dict] = None) -> None:
    """Writes the gradients that are not None in place: ``dq``, ``dk``, ``dv`` (the inputs' shapes,
    any strides), ``dlog_decay`` (B, Hq, S) float32, ``ds0`` / ``dz0`` (the initial state's shapes).

    ``dout`` is the gradient of out, ``ds_final`` / ``dz_final`` (None: zero) that of the returned
    final state ``s_final`` / ``z_final``; the rest as in `linear_forward`."""
    b, hq, seq, f = q.shape
    hkv, dvv = k.shape[1], v.shape[-1]
    group = hq // hkv
    if b * hq == 0:
        return
    if seq == 0:  # nothing but the state passing through
        for grad, final in ((ds0, ds_final), (dz0, dz_final)):
            if grad is not None:
                grad.copy_(final) if final is not None else grad.zero_()
        return
    chunk_state, _, chunk_grad, _ = _kernels()
    config = _config(q, v, config)
    consts = _consts(q, v, feature_map, causal, log_decay, normalize)
    dots = _dot_consts(q)
    blocks, opts = _blocks(config), _launch_opts(config)
    bt, bk, bv = config["BT"], config["BK"], config["BV"]
    num_chunks = _cdiv(seq, bt)
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    g_arg, g_strides = (q, (0, 0, 0)) if log_decay is None else (log_decay, log_decay.stride())
    common = (hq, group, seq)

    # states before each chunk (causal: recomputed; non-causal: the forward's final state)
    if causal:
        h = torch.empty(b * hq, num_chunks, f, dvv, **f32)
        hz = torch.empty(b * hq, num_chunks, f, **f32)
        _state_forward(q, k, v, log_decay, state_s, state_z, h, hz, torch.empty(b * hq, f, dvv, **f32),
                       torch.empty(b * hq, f, **f32), consts, config)
        h_strides = (num_chunks * f * dvv, f * dvv, num_chunks * f, f)
    else:
        h, hz = s_final.contiguous(), z_final.contiguous()
        h_strides = (f * dvv, 0, f, 0)

    r = dden = q  # placeholders the kernels do not read without normalize
    if normalize:
        r, dden = torch.empty(b * hq, seq, **f32), torch.empty(b * hq, seq, **f32)
        chunk_grad.chunk_norm_grad_kernel[(num_chunks, b * hq)](
            q, k, g_arg, hz, out, dout, r, dden, *q.stride(), *k.stride(), *g_strides, *out.stride(),
            *dout.stride(), h_strides[2], h_strides[3], *common, float(scale), float(eps),
            F=f, DV=dvv, FMAP=consts["FMAP"], CAUSAL=consts["CAUSAL"], HAS_DECAY=consts["HAS_DECAY"],
            **dots, **blocks, **opts)

    # gradients of the state after each chunk (non-causal: of the one state), and of the initial state
    dh_chunks = num_chunks if causal else 1
    dh = torch.empty(b * hq, dh_chunks, f, dvv, **f32)
    dhz = torch.empty(b * hq, dh_chunks, f, **f32)
    ds0_ = torch.empty(b * hq, f, dvv, **f32)
    dz0_ = torch.empty(b * hq, f, **f32)
    has_dfinal = ds_final is not None or dz_final is not None
    if has_dfinal:
        ds_final = torch.zeros_like(s_final) if ds_final is None else ds_final
        dz_final = torch.zeros_like(z_final) if dz_final is None else dz_final
    chunk_state.chunk_state_backward_kernel[(_cdiv(f, bk), _cdiv(dvv, bv), b * hq)](
        q, g_arg, dout, r, dden, q if ds_final is None else ds_final, q if dz_final is None else dz_final,
        dh, dhz, ds0_, dz0_, *q.stride(), *g_strides, *dout.stride(), *_strides(ds_final, 4),
        *_strides(dz_final, 3), hq, seq, num_chunks, float(scale), HAS_DFINAL=has_dfinal,
        **consts, **dots, **blocks, **opts)
    if ds0 is not None:
        ds0.copy_(ds0_.view(ds0.shape))
    if dz0 is not None:
        dz0.copy_(dz0_.view(dz0.shape))
    dh_strides = (dh_chunks * f * dvv, f * dvv if causal else 0, dh_chunks * f, f if causal else 0)

    if dv is not None:
        dv_ = dv if group == 1 else torch.empty(b, hq, seq, dvv, **f32)
        chunk_grad.chunk_dv_kernel[(_cdiv(dvv, bv), num_chunks, b * hq)](
            q, k, g_arg, dout, r, dh, dv_, *q.stride(), *k.stride(), *g_strides, *dout.stride(), *dv_.stride(),
            dh_strides[0], dh_strides[1], *common, float(scale), **consts, **dots, **blocks, **opts)
        if group != 1:
            _group_sum(dv_, dv)

    if dq is not None or dk is not None or dlog_decay is not None:
        dq_ = dq if dq is not None else torch.empty(b, hq, seq, f, **f32)
        dk_ = dk if dk is not None and group == 1 else torch.empty(b, hq, seq, f, **f32)
        num_fblocks = _cdiv(f, bk)
        dg = torch.empty(num_fblocks, b * hq, seq, **f32) if dlog_decay is not None else q
        chunk_grad.chunk_dqk_kernel[(num_fblocks, num_chunks, b * hq)](
            q, k, v, g_arg, dout, r, dden, h, hz, dh, dhz, dq_, dk_, dg,
            *q.stride(), *k.stride(), *v.stride(), *g_strides, *dout.stride(), *dq_.stride(), *dk_.stride(),
            *h_strides, *dh_strides, b * hq * seq, *common, float(scale), STORE_DG=dlog_decay is not None,
            **consts, **dots, **blocks, **opts)
        if dk is not None and group != 1:
            _group_sum(dk_, dk)
        if dlog_decay is not None:
            # dB_t summed over feature blocks; the final state depends on the last B through its factor
            d_b = dg.sum(0).view(b, hq, seq)
            if has_dfinal:
                # a sum of F * Dv products, large next to the result: accumulated in float64
                d_b[:, :, -1] += ((ds_final.double() * s_final).sum((-1, -2))
                                  + (dz_final.double() * z_final).sum(-1)).float()
            dlog_decay.copy_(d_b.flip(-1).cumsum(-1).flip(-1))
