"""Plain-PyTorch references: the ground truth every pyattn kernel is tested against.

They follow `shared/API.md` exactly and are written to be read, not to be fast:
scores are materialized, loops are used where they are clearer. They do not
validate their input (the public ops do that first). Common rules:

* Layout: `q (B, Hq, Sq, D)`, `k (B, Hkv, Sk, D)`, `v (B, Hkv, Sk, Dv)`, any
  strides. GQA/MQA: query head `h` reads kv head `h // (Hq // Hkv)`.
* `scale=None` means `1 / sqrt(D)`.
* Arithmetic runs in float32, or float64 for float64 inputs (float16/bfloat16
  inputs are upcast); outputs are cast back to the input dtype; `lse` (natural
  log) and recurrent states stay in that compute dtype.
* Everything is differentiable with autograd in every floating-point tensor
  input, without NaN gradients for rows that see no key.
* Empty sequences give empty outputs (and the initial state, for linear attention).

Masks, with `off = Sk - Sq` (bottom-right alignment)::

    causal:            query i sees key j iff  j <= i + off
    window (l, r):     query i sees key j iff  i + off - l <= j <= i + off + r   (-1 = unbounded)

    causal, Sq=3, Sk=5          window (1, 0), Sq=Sk=4
        k: 0 1 2 3 4                k: 0 1 2 3
    q0:    x x x . .            q0:    x . . .
    q1:    x x x x .            q1:    x x . .
    q2:    x x x x x            q2:    . x x .
                                q3:    . . x x

A row that sees no key outputs zeros and has `lse = -inf`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .feature_maps import resolve

__all__ = [
    "attention",
    "attention_varlen",
    "dropout_keep_mask",
    "dropout_keep_mask_varlen",
    "philox_uint32",
    "linear_attention",
    "linear_attention_recurrent",
    "block_sparse_attention",
    "block_upper_bounds",
    "topk_block_indices",
    "topk_attention",
    "cross_attention",
    "merge_attention",
]

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------- helpers

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 input, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _default_scale(scale: Optional[float], head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _expand_kv_heads(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """(B, Hkv, ...) -> (B, Hq, ...): query head h gets kv head h // (Hq // Hkv)."""
    group = num_q_heads // x.shape[1]
    return x.repeat_interleave(group, dim=1) if group != 1 else x


def _visible(seq_q: int, seq_k: int, causal: bool, window: Sequence[int],
             device: torch.device) -> torch.Tensor:
    """Bool (Sq, Sk): which keys each query may see under the causal and window masks."""
    i = torch.arange(seq_q, device=device)[:, None]
    j = torch.arange(seq_k, device=device)[None, :]
    diagonal = i + (seq_k - seq_q)  # the key aligned with query i (bottom-right)
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    left, right = window
    if causal:
        visible &= j <= diagonal
    if left >= 0:
        visible &= j >= diagonal - left
    if right >= 0:
        visible &= j <= diagonal + right
    return visible


def _masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim restricted to `visible`, and its log-sum-exp.

    Rows with nothing visible give probabilities 0 and lse -inf. The row maximum
    is a pure stabilizer (it cancels mathematically), so it is detached, and
    every division and log is guarded, so such rows give zero gradients, not NaN.
    """
    scores = torch.where(visible, scores, _NEG_INF)
    if scores.shape[-1] > 0:
        row_max = scores.amax(-1, keepdim=True).detach()
    else:
        row_max = scores.new_full(scores.shape[:-1] + (1,), _NEG_INF)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    weights = torch.exp(scores - row_max)
    total = weights.sum(-1, keepdim=True)
    has_key = total > 0
    safe_total = torch.where(has_key, total, 1.0)
    probs = weights / safe_total
    lse = torch.where(has_key, row_max + torch.log(safe_total), _NEG_INF).squeeze(-1)
    return probs, lse


def _softmax_attention(q, k, v, *, scale, causal=False, window=(-1, -1), softcap=0.0,
                       attn_bias=None, keep=None, dropout_p=0.0):
    """Core of the softmax family on compute-dtype tensors in (B, H, S, D) layout.

    `attn_bias`: float (added to the scores) or bool (True = keep), broadcastable
    to (B, Hq, Sq, Sk). `keep`: bool dropout keep mask (B, Hq, Sq, Sk) or None.
    Returns out (B, Hq, Sq, Dv) and lse (B, Hq, Sq) in the compute dtype.
    """
    num_q_heads, seq_q, seq_k = q.shape[1], q.shape[2], k.shape[2]
    k = _expand_kv_heads(k, num_q_heads)
    v = _expand_kv_heads(v, num_q_heads)

    scores = scale * (q @ k.transpose(-1, -2))
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    visible = _visible(seq_q, seq_k, causal, window, q.device)
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            visible = visible & attn_bias
        else:
            scores = scores + attn_bias.to(scores.dtype)

    probs, lse = _masked_softmax(scores, visible)
    if dropout_p > 0:
        probs = probs * keep / (1.0 - dropout_p)
    return probs @ v, lse


def _seed_from_global_generator() -> int:
    return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64).item())


# --------------------------------------------------------------------------- 1. softmax

_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_STEP = (0x9E3779B9, 0xBB67AE85)


def _mul_hi_lo(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of the 64-bit product of the 32-bit constant `a` and int64 tensor `b` (< 2**32),
    computed in int64 without overflow by splitting `b` into 16-bit halves."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo_part, hi_part = a * b_lo, a * b_hi  # each < 2**48
    hi = (hi_part + (lo_part >> 16)) >> 16
    lo = ((hi_part << 16) + lo_part) & _MASK32
    return hi, lo


def philox_uint32(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 (Salmon et al. 2011), first output word, as int64 tensor in [0, 2**32).

    Key ``(seed & 0xFFFFFFFF, seed >> 32)``; counter ``(offset & 0xFFFFFFFF, offset >> 32, 0, 0)``
    for each int64 offset. This is what Triton's ``tl.randint(seed, offset)`` returns for an
    int64 offset, and what the C++ kernels compute.
    """
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _MASK32, seed >> 32
    c0, c1 = offsets & _MASK32, (offsets >> 32) & _MASK32
    c2, c3 = torch.zeros_like(offsets), torch.zeros_like(offsets)
    for _ in range(10):
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND[0], c0)
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND[1], c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_STEP[0]) & _MASK32, (k1 + _PHILOX_KEY_STEP[1]) & _MASK32
    return c0


def dropout_threshold(p: float) -> int:
    """Entries whose 24-bit draw ``philox >> 8`` is at least this are kept (probability ~ 1 - p)."""
    return math.ceil(p * (1 << 24))


def dropout_keep_from_offsets(seed: int, offsets: torch.Tensor, p: float) -> torch.Tensor:
    """Keep mask for int64 counter `offsets`: ``(philox_uint32(seed, offset) >> 8) >= dropout_threshold(p)``."""
    return (philox_uint32(seed, offsets) >> 8) >= dropout_threshold(p)


def dropout_keep_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """The dropout keep mask every backend reproduces in-kernel, as a bool tensor of `shape` (B, H, Sq, Sk).

    Entry ``(b, h, i, j)`` draws Philox with counter ``offset = ((b * H + h) * Sq + i) * Sk + j``
    (`philox_uint32`) and is kept iff its top 24 bits are ``>= ceil(p * 2**24)``.
    """
    offsets = torch.arange(math.prod(shape), dtype=torch.int64, device=device).reshape(tuple(shape))
    return dropout_keep_from_offsets(seed, offsets, p)


def dropout_keep_mask_varlen(seed: int, heads: int, total_q: int, total_k: int, rows_q: torch.Tensor,
                             rows_k: torch.Tensor, p: float) -> torch.Tensor:
    """Keep mask (heads, len(rows_q), len(rows_k)) of one packed sequence whose rows in the packed q and k
    are `rows_q`, `rows_k`: counter ``offset = (h * total_q + row_q) * total_k + row_k``."""
    h = torch.arange(heads, dtype=torch.int64, device=rows_q.device)[:, None, None]
    offsets = (h * total_q + rows_q.long()[None, :, None]) * total_k + rows_k.long()[None, None, :]
    return dropout_keep_from_offsets(seed, offsets, p)


def attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
              attn_bias=None, dropout_p=0.0, dropout_seed=None, return_lse=False):
    """Softmax attention (API.md section 1).

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) -> out (B, Hq, Sq, Dv)
    [, lse (B, Hq, Sq)].

    scores = scale * q k^T; softcap * tanh(scores / softcap) when softcap > 0;
    + attn_bias (float) or masked by attn_bias (bool, True = keep); masked by the
    causal / window masks (module docstring); P = softmax(scores);
    out = dropout(P) v. `lse` is the log-sum-exp of the final scores, before
    dropout. Dropout keeps entry (b, h, i, j) where
    `dropout_keep_mask(dropout_seed, (B, Hq, Sq, Sk), dropout_p, device)` is True
    and rescales by 1 / (1 - dropout_p); `dropout_seed=None` draws a seed from
    the global torch generator.
    """
    cdt = _compute_dtype(q)
    scale = _default_scale(scale, q.shape[-1])
    keep = None
    if dropout_p > 0:
        seed = _seed_from_global_generator() if dropout_seed is None else dropout_seed
        batch, heads, seq_q, seq_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        keep = dropout_keep_mask(seed, (batch, heads, seq_q, seq_k), dropout_p, q.device)
    out, lse = _softmax_attention(q.to(cdt), k.to(cdt), v.to(cdt), scale=scale, causal=causal,
                                  window=tuple(window), softcap=softcap, attn_bias=attn_bias,
                                  keep=keep, dropout_p=dropout_p)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     causal=False, scale=None, window=(-1, -1), softcap=0.0,
                     dropout_p=0.0, dropout_seed=None, return_lse=False):
    """Softmax attention over packed ragged sequences.

    q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); sequence b is
    rows `cu_seqlens_q[b]:cu_seqlens_q[b+1]` of q and `cu_seqlens_k[b]:cu_seqlens_k[b+1]`
    of k and v, attended exactly as `attention` would attend it alone: the causal
    and window masks are aligned bottom-right with that sequence's own lengths.
    Returns out (total_q, Hq, Dv) [, lse (Hq, total_q)]. Rows of q past
    `cu_seqlens_q[-1]` belong to no sequence: zeros, lse -inf. `max_seqlen_*`
    are hints for kernels and are not used here.

    Dropout: `dropout_keep_mask_varlen`, a Philox counter per (head, packed q row,
    packed k row), so the mask does not depend on how the batch is split.
    """
    cdt = _compute_dtype(q)
    scale = _default_scale(scale, q.shape[-1])
    num_q_heads, dim_v = q.shape[1], v.shape[-1]
    starts_q = [int(x) for x in cu_seqlens_q.tolist()]
    starts_k = [int(x) for x in cu_seqlens_k.tolist()]
    seed = None
    if dropout_p > 0:
        seed = _seed_from_global_generator() if dropout_seed is None else dropout_seed

    outs, lses = [], []
    for b in range(len(starts_q) - 1):
        # (s, H, D) -> (1, H, s, D)
        q_b = q[starts_q[b]:starts_q[b + 1]].to(cdt).transpose(0, 1)[None]
        k_b = k[starts_k[b]:starts_k[b + 1]].to(cdt).transpose(0, 1)[None]
        v_b = v[starts_k[b]:starts_k[b + 1]].to(cdt).transpose(0, 1)[None]
        keep = None
        if seed is not None:
            rows_q = torch.arange(starts_q[b], starts_q[b + 1], device=q.device)
            rows_k = torch.arange(starts_k[b], starts_k[b + 1], device=q.device)
            keep = dropout_keep_mask_varlen(seed, num_q_heads, q.shape[0], k.shape[0], rows_q, rows_k,
                                            dropout_p)[None]
        out_b, lse_b = _softmax_attention(q_b, k_b, v_b, scale=scale, causal=causal, window=tuple(window),
                                          softcap=softcap, keep=keep, dropout_p=dropout_p)
        outs.append(out_b[0].transpose(0, 1))  # (s, H, Dv)
        lses.append(lse_b[0])                  # (H, s)

    covered = starts_q[-1] if starts_q else 0
    tail = q.shape[0] - covered
    outs.append(q.new_zeros((tail, num_q_heads, dim_v), dtype=cdt))
    lses.append(q.new_full((num_q_heads, tail), _NEG_INF, dtype=cdt))
    out = torch.cat(outs, 0).to(q.dtype)
    lse = torch.cat(lses, 1)
    return (out, lse) if return_lse else out


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Combine two softmax attentions over disjoint key sets into the attention over their union.

    out_* (..., Dv), lse_* (...) (out's shape without its last dim). With
    `lse = log(exp(lse_a) + exp(lse_b))`::

        out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

    A side with lse -inf (it saw no key) contributes nothing; both -inf gives
    zeros and lse -inf. Computes in float32 (float64 for float64 inputs);
    returns out in out_a's dtype and lse in the compute dtype.
    """
    cdt = _compute_dtype(out_a)
    lse_a, lse_b = lse_a.to(cdt), lse_b.to(cdt)
    top = torch.maximum(lse_a, lse_b).detach()  # a stabilizer: it cancels
    top = torch.where(torch.isfinite(top), top, 0.0)
    weight_a = torch.exp(lse_a - top)
    weight_b = torch.exp(lse_b - top)
    total = weight_a + weight_b
    has_key = total > 0
    safe_total = torch.where(has_key, total, 1.0)
    out = (weight_a[..., None] * out_a.to(cdt) + weight_b[..., None] * out_b.to(cdt)) / safe_total[..., None]
    lse = torch.where(has_key, top + torch.log(safe_total), _NEG_INF)
    return out.to(out_a.dtype), lse


# --------------------------------------------------------------------------- 2. linear

def _per_token_log_decay(log_decay, batch, heads, seq, dtype, device) -> torch.Tensor:
    """None / float / (Hq,) / (B, Hq, S) -> (B, Hq, S) log decays."""
    if log_decay is None:
        return torch.zeros(batch, heads, seq, dtype=dtype, device=device)
    if not torch.is_tensor(log_decay):
        return torch.full((batch, heads, seq), float(log_decay), dtype=dtype, device=device)
    log_decay = log_decay.to(dtype)
    if log_decay.dim() == 1:
        log_decay = log_decay[None, :, None]
    return log_decay.expand(batch, heads, seq)


def _linear_inputs(q, k, v, feature_map, scale, log_decay, initial_state):
    """Features, values, log decays and initial state, all in the compute dtype and per query head."""
    cdt = _compute_dtype(q)
    fmap = resolve(feature_map)
    batch, heads, seq = q.shape[0], q.shape[1], q.shape[2]
    qf = fmap(q.to(cdt)).to(cdt) * scale                        # (B, Hq, S, F)
    kf = _expand_kv_heads(fmap(k.to(cdt)).to(cdt), heads)        # (B, Hq, S, F)
    vc = _expand_kv_heads(v.to(cdt), heads)                      # (B, Hq, S, Dv)
    log_a = _per_token_log_decay(log_decay, batch, heads, seq, cdt, q.device)
    if initial_state is None:
        state = qf.new_zeros(batch, heads, qf.shape[-1], vc.shape[-1])
        norm = qf.new_zeros(batch, heads, qf.shape[-1])
    else:
        state, norm = initial_state[0].to(cdt), initial_state[1].to(cdt)
    return qf, kf, vc, log_a, state, norm


def _linear_output(numerator, denominator, normalize, eps, dtype):
    out = numerator / (denominator + eps)[..., None] if normalize else numerator
    return out.to(dtype)


def linear_attention(q, k, v, *, causal=True, feature_map="elu", normalize=True, log_decay=None,
                     scale=1.0, eps=1e-6, initial_state=None, output_final_state=False):
    """Linear(-recurrent) attention in closed, all-tokens-at-once form (API.md section 2).

    q (B, Hq, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) -> out (B, Hq, S, Dv)
    [, (S_final (B, Hq, F, Dv), z_final (B, Hq, F))].

    With `qf = f(q) * scale`, `kf = f(k)`, `a_t = exp(log_decay_t)`, the causal
    recurrence `S_t = a_t S_{t-1} + kf_t^T v_t`, `z_t = a_t z_{t-1} + kf_t` from
    `(S_0, z_0) = initial_state` (zeros if None) unrolls to::

        D[t, s] = exp(sum_{r=s+1..t} log_decay_r)   for s <= t, else 0
        A       = (qf kf^T) * D
        num_t   = (A v)_t + exp(sum_{r<=t} log_decay_r) * qf_t S_0
        den_t   = sum_s A[t, s] + exp(sum_{r<=t} log_decay_r) * qf_t . z_0
        out_t   = num_t / (den_t + eps)  if normalize else num_t

    Non-causal: `S = S_0 + kf^T v`, `z = z_0 + sum_t kf_t`, `out_t = qf_t S / (qf_t . z + eps)`
    (log_decay must be None). `log_decay`: None, a float, a (Hq,) tensor or a
    (B, Hq, S) tensor. States are float32 (float64 for float64 inputs).
    `linear_attention_recurrent` is the same thing as a token loop.
    """
    qf, kf, vc, log_a, state0, norm0 = _linear_inputs(q, k, v, feature_map, scale, log_decay, initial_state)
    seq = qf.shape[2]

    if not causal:
        if log_decay is not None:
            raise ValueError("linear_attention: log_decay needs causal=True")
        state = state0 + kf.transpose(-1, -2) @ vc
        norm = norm0 + kf.sum(-2)
        numerator = qf @ state
        denominator = (qf * norm[:, :, None, :]).sum(-1)
    else:
        # seg[t, s] = sum_{r=s+1..t} log_decay_r, built as a cumulative sum down
        # the columns of a strictly-lower-triangular copy of log_decay (no
        # difference of prefix sums, so no cancellation over long sequences).
        t_idx = torch.arange(seq, device=q.device)
        strictly_lower = t_idx[:, None] > t_idx[None, :]
        lower = t_idx[:, None] >= t_idx[None, :]
        seg = torch.where(strictly_lower, log_a[..., :, None].expand(*log_a.shape, seq), 0.0).cumsum(-2)
        decay = torch.exp(torch.where(lower, seg, _NEG_INF))             # D[t, s], (B, H, S, S)
        scores = (qf @ kf.transpose(-1, -2)) * decay                       # A, (B, H, S, S)
        from_start = torch.exp(log_a.cumsum(-1))                           # decay since the initial state
        numerator = scores @ vc + from_start[..., None] * (qf @ state0)
        denominator = scores.sum(-1) + from_start * (qf * norm0[:, :, None, :]).sum(-1)

        # Final state: token s is decayed by the log decays of the tokens after it.
        after = torch.cat([log_a[..., 1:], torch.zeros_like(log_a[..., :1])], -1)
        to_end = torch.exp(after.flip(-1).cumsum(-1).flip(-1))             # (B, H, S)
        total = torch.exp(log_a.sum(-1))                                   # (B, H)
        weighted_kf = kf * to_end[..., None]
        state = total[..., None, None] * state0 + weighted_kf.transpose(-1, -2) @ vc
        norm = total[..., None] * norm0 + weighted_kf.sum(-2)

    out = _linear_output(numerator, denominator, normalize, eps, q.dtype)
    return (out, (state, norm)) if output_final_state else out


def linear_attention_recurrent(q, k, v, *, causal=True, feature_map="elu", normalize=True, log_decay=None,
                               scale=1.0, eps=1e-6, initial_state=None, output_final_state=False):
    """`linear_attention` as a plain loop over tokens (same arguments and results).

    Causal: for t = 0..S-1, `S = a_t S + kf_t^T v_t`, `z = a_t z + kf_t`, then
    `out_t = qf_t S / (qf_t . z + eps)`. Non-causal: the state is summed over all
    tokens first, then every token reads it.
    """
    qf, kf, vc, log_a, state, norm = _linear_inputs(q, k, v, feature_map, scale, log_decay, initial_state)
    seq = qf.shape[2]
    if not causal:
        if log_decay is not None:
            raise ValueError("linear_attention_recurrent: log_decay needs causal=True")
        for t in range(seq):
            state = state + kf[:, :, t, :, None] * vc[:, :, t, None, :]
            norm = norm + kf[:, :, t]

    numerators, denominators = [], []
    for t in range(seq):
        if causal:
            a_t = torch.exp(log_a[:, :, t])
            state = a_t[..., None, None] * state + kf[:, :, t, :, None] * vc[:, :, t, None, :]
            norm = a_t[..., None] * norm + kf[:, :, t]
        q_t = qf[:, :, t]                                                   # (B, H, F)
        numerators.append((q_t[..., :, None] * state).sum(-2))             # (B, H, Dv)
        denominators.append((q_t * norm).sum(-1))                          # (B, H)

    if seq:
        numerator, denominator = torch.stack(numerators, 2), torch.stack(denominators, 2)
    else:
        numerator = qf.new_zeros(qf.shape[0], qf.shape[1], 0, vc.shape[-1])
        denominator = qf.new_zeros(qf.shape[0], qf.shape[1], 0)
    out = _linear_output(numerator, denominator, normalize, eps, q.dtype)
    return (out, (state, norm)) if output_final_state else out


# --------------------------------------------------------------------------- 3. block-sparse / top-k

def _num_blocks(seq: int, block_size: int) -> int:
    return (seq + block_size - 1) // block_size


def _block_mask_to_tokens(block_mask: torch.Tensor, block_size: int, seq_q: int, seq_k: int) -> torch.Tensor:
    """(..., n_qblocks, n_kblocks) bool -> (..., Sq, Sk) bool."""
    # index by block number rather than repeat, so memory follows Sq * Sk, not block_size
    q_block = torch.arange(seq_q, device=block_mask.device) // block_size
    k_block = torch.arange(seq_k, device=block_mask.device) // block_size
    return block_mask[..., q_block, :][..., k_block]


def block_sparse_attention(q, k, v, block_indices, *, block_size=64, causal=True, scale=None,
                           return_lse=False):
    """Softmax attention restricted to selected key blocks (API.md section 3).

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv),
    block_indices int (B, Hkv, ceil(Sq / block_size), n_sel) -> out (B, Hq, Sq, Dv) [, lse].

    Query block i is queries [i*bs, (i+1)*bs), key block j keys [j*bs, (j+1)*bs).
    Every query of block i (in every query head of kv-head group g) attends to
    the union of the key blocks listed in `block_indices[b, g, i]` (-1 entries
    are padding, order and duplicates do not matter), intersected with the
    bottom-right causal mask when `causal`. Equal to `attention` with that bool
    `attn_bias`.
    """
    seq_q, seq_k = q.shape[2], k.shape[2]
    num_kblocks = _num_blocks(seq_k, block_size)
    indices = block_indices.to(device=q.device, dtype=torch.long)
    # Scatter into one spare column (index num_kblocks) for the -1 padding, then drop it.
    indices = torch.where(indices >= 0, indices, num_kblocks)
    selected = torch.zeros(*indices.shape[:3], num_kblocks + 1, dtype=torch.bool, device=q.device)
    selected.scatter_(-1, indices, True)
    keep = _block_mask_to_tokens(selected[..., :num_kblocks], block_size, seq_q, seq_k)  # (B, Hkv, Sq, Sk)
    keep = _expand_kv_heads(keep, q.shape[1])                                             # (B, Hq, Sq, Sk)
    return attention(q, k, v, causal=causal, scale=scale, attn_bias=keep, return_lse=return_lse)


def block_upper_bounds(q, k, *, block_size=64, scale=None) -> torch.Tensor:
    """Quest upper bounds of the logits between query blocks and key blocks.

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D) -> (B, Hkv, n_qblocks, n_kblocks), float32
    (float64 for float64 inputs), not differentiable. For kv head g, query block
    i and key block j, with kmin_j / kmax_j the per-channel min / max of the keys
    of block j::

        bound[b, g, i, j] = max over query heads h of group g, over queries t of block i, of
                            sum_c max(scale * q_tc * kmin_jc, scale * q_tc * kmax_jc)

    which is >= scale * q_t . k_s for every such query t and key s of block j.
    """
    cdt = _compute_dtype(q)
    scale = _default_scale(scale, q.shape[-1])
    batch, q_heads, seq_q, _ = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    num_qblocks, num_kblocks = _num_blocks(seq_q, block_size), _num_blocks(seq_k, block_size)
    with torch.no_grad():
        qc, kc = q.to(cdt), k.to(cdt)
        per_query = []  # one (B, Hq, Sq) per key block
        for j in range(num_kblocks):
            keys = kc[:, :, j * block_size:(j + 1) * block_size]                  # (B, Hkv, bs, D)
            kmin = _expand_kv_heads(keys.amin(2), q_heads)[:, :, None, :]          # (B, Hq, 1, D)
            kmax = _expand_kv_heads(keys.amax(2), q_heads)[:, :, None, :]
            per_query.append(torch.maximum(scale * qc * kmin, scale * qc * kmax).sum(-1))
        bound_q = (torch.stack(per_query, -1) if per_query
                   else qc.new_zeros(batch, q_heads, seq_q, 0))                    # (B, Hq, Sq, nkb)
        # max over the query heads of each kv-head group ...
        bound_q = bound_q.unflatten(1, (kv_heads, q_heads // kv_heads)).amax(2)    # (B, Hkv, Sq, nkb)
        # ... and over the queries of each query block.
        bounds = [bound_q[:, :, i * block_size:(i + 1) * block_size].amax(2) for i in range(num_qblocks)]
        if not bounds:
            return bound_q.new_zeros(batch, kv_heads, 0, num_kblocks)
        return torch.stack(bounds, 2)


def _diagonal_block(i: int, block_size: int, seq_q: int, seq_k: int, num_kblocks: int) -> int:
    """The key block holding the last key that the last query of query block i may see
    (bottom-right aligned); negative when that query sees no key."""
    last_query = min((i + 1) * block_size, seq_q) - 1
    return min(num_kblocks - 1, (last_query + seq_k - seq_q) // block_size)


def topk_block_indices(q, k, *, top_k, block_size=64, causal=True, scale=None,
                       num_sink_blocks=1, num_local_blocks=1) -> torch.Tensor:
    """The key blocks each query block keeps, as `topk_attention` selects them.

    Returns int32 (B, Hkv, n_qblocks, n_sel), `n_sel = min(num_sink_blocks +
    num_local_blocks + top_k, n_kblocks)` (every kept block fits, and no row holds
    more blocks than exist), each row sorted ascending with -1 padding at the end.
    For query block i (last query `t_i = min((i+1)*bs, Sq) - 1`), per (b, kv head):

    * sink blocks 0 .. num_sink_blocks-1 (those that exist);
    * local blocks: the diagonal block `d_i = min(nkb-1, (t_i + Sk - Sq) // bs)`
      and the num_local_blocks-1 blocks before it (those >= 0; none when d_i < 0),
      computed the same way when causal=False;
    * the `top_k` other blocks with the highest `block_upper_bounds`, among the
      blocks causally visible to some query of the block (`j <= d_i`) when
      causal, among all blocks otherwise. Ties go to the lower block index.
    """
    batch, kv_heads = k.shape[0], k.shape[1]
    seq_q, seq_k = q.shape[2], k.shape[2]
    num_qblocks, num_kblocks = _num_blocks(seq_q, block_size), _num_blocks(seq_k, block_size)
    num_sel = min(num_sink_blocks + num_local_blocks + top_k, num_kblocks)
    bounds = block_upper_bounds(q, k, block_size=block_size, scale=scale)   # (B, Hkv, nqb, nkb)
    result = torch.full((batch, kv_heads, num_qblocks, num_sel), -1, dtype=torch.int32, device=q.device)

    for i in range(num_qblocks):
        diagonal = _diagonal_block(i, block_size, seq_q, seq_k, num_kblocks)
        fixed = set(range(min(num_sink_blocks, num_kblocks)))
        fixed |= {j for j in range(diagonal - num_local_blocks + 1, diagonal + 1) if j >= 0}
        reachable = range(min(diagonal + 1, num_kblocks)) if causal else range(num_kblocks)
        candidates = [j for j in reachable if j not in fixed]
        fixed_t = torch.tensor(sorted(fixed), dtype=torch.long, device=q.device)
        if candidates and top_k > 0:
            cand_t = torch.tensor(candidates, dtype=torch.long, device=q.device)
            scores = bounds[:, :, i, cand_t]                                       # (B, Hkv, n_cand)
            # Stable descending sort: among equal bounds the lower block index wins.
            order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :top_k]
            chosen = cand_t[order]                                                 # (B, Hkv, <=top_k)
        else:
            chosen = torch.zeros(batch, kv_heads, 0, dtype=torch.long, device=q.device)
        kept = torch.cat([fixed_t.expand(batch, kv_heads, -1), chosen], -1).sort(-1).values
        result[:, :, i, :kept.shape[-1]] = kept.to(torch.int32)
    return result


def topk_attention(q, k, v, *, top_k, block_size=64, causal=True, scale=None, num_sink_blocks=1,
                   num_local_blocks=1, return_block_indices=False):
    """Quest-style top-k block attention: `block_sparse_attention` on `topk_block_indices`.

    Returns out (B, Hq, Sq, Dv) [, block_indices int32 (B, Hkv, n_qblocks, n_sel)].
    When top_k covers every block this equals `attention(q, k, v, causal=causal)`.
    The selection is piecewise constant in q and k, so gradients flow through
    the attention only.
    """
    indices = topk_block_indices(q, k, top_k=top_k, block_size=block_size, causal=causal, scale=scale,
                                 num_sink_blocks=num_sink_blocks, num_local_blocks=num_local_blocks)
    out = block_sparse_attention(q, k, v, indices, block_size=block_size, causal=causal, scale=scale)
    return (out, indices) if return_block_indices else out


# --------------------------------------------------------------------------- 4. cross

def cross_attention(q, k, v, *, kv_lengths=None, key_padding_mask=None, scale=None, return_lse=False):
    """Non-causal attention of few queries over many keys (API.md section 4).

    q (B, Hq, Sq, D) (may be broadcast over the batch, stride 0), k (B, Hkv, Sk, D),
    v (B, Hkv, Sk, Dv) -> out (B, Hq, Sq, Dv) [, lse (B, Hq, Sq)].
    Batch item b uses key s iff `s < kv_lengths[b]` (when given) and
    `not key_padding_mask[b, s]` (when given; True = padding). A batch item with
    no usable key outputs zeros and lse -inf.
    """
    batch, seq_k = k.shape[0], k.shape[2]
    usable = torch.ones(batch, seq_k, dtype=torch.bool, device=q.device)
    if kv_lengths is not None:
        lengths = torch.as_tensor(kv_lengths, device=q.device).to(torch.long)
        usable &= torch.arange(seq_k, device=q.device)[None, :] < lengths[:, None]
    if key_padding_mask is not None:
        usable &= ~key_padding_mask.to(device=q.device, dtype=torch.bool)
    return attention(q, k, v, scale=scale, attn_bias=usable[:, None, None, :], return_lse=return_lse)
