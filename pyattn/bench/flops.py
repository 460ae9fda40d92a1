"""FLOP and byte counts: one formula per op family, used for every provider of that family.

Shapes are a `Shape` (batch B, query heads H, seq_q Sq, seq_k Sk, head dims D and Dv).
The counts are those of the algorithm's matmuls, not of whatever a provider really
executes, so TFLOP/s compares providers on equal terms.

softmax (``pyattn.attention``) and cross (``pyattn.cross_attention``)
    forward ``2 * B * H * Sq * Sk * (D + Dv)`` (``Q K^T`` and ``P V``; ``4 B H Sq Sk D``
    when ``Dv == D``), half of it when causal (FlashAttention's convention: the masked
    half is skipped). Cross-attention is never causal.
decode (``pyattn.attention`` with few queries over a long KV cache, bottom-right causal)
    the same per visible (query, key) pair; a causal decode step of ``Sq <= Sk`` queries
    sees ``Sq * Sk - Sq * (Sq - 1) / 2`` pairs (all of them for one query).
backward
    2.5x the forward (five matmuls instead of two: ``dV``, ``dP``, ``dQ``, ``dK`` and
    the recomputed ``Q K^T``); forward + backward 3.5x.
linear (``pyattn.linear_attention``), chunked form with chunk ``C = min(64, S)``
    per (batch, head) and token: the state update ``kf^T v`` and the read-out
    ``qf S`` (``2 * F * Dv`` each), plus, when causal, the intra-chunk scores
    ``qf kf^T`` and their product with ``v`` (``2 * C * F`` and ``2 * C * Dv``, full
    ``C x C`` blocks): forward ``2 * B * H * S * (2 * F * Dv + C * (F + Dv))`` causal,
    ``4 * B * H * S * F * Dv`` non-causal, where ``F = D`` (elu feature map). The
    normaliser (one more column of ``v``) and the feature map are left out. Backward 2x the
    forward (each matmul's two operand gradients, nothing recomputed); forward + backward 3x.

Bytes (for GB/s, reported for the memory-bound families decode and cross): the
least a kernel must move, each tensor read or written once: forward reads q, k, v and
writes out; backward reads q, k, v, out, dout and writes dq, dk, dv (the float32 lse
and any state are left out).
"""
from __future__ import annotations

from .case import Shape

PASSES = ("fwd", "bwd", "fwd+bwd")
_SOFTMAX_PASS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
_LINEAR_PASS = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}
LINEAR_CHUNK = 64


def _check_pass(pass_: str) -> None:
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")


def softmax_flops(shape: Shape, causal: bool, pass_: str) -> float:
    """Dense softmax attention, ``seq_q == seq_k`` style: half the pairs when causal."""
    _check_pass(pass_)
    s = shape
    forward = 2.0 * s.batch * s.heads_q * s.seq_q * s.seq_k * (s.head_dim + s.head_dim_v)
    return forward / (2 if causal else 1) * _SOFTMAX_PASS[pass_]


def decode_flops(shape: Shape, causal: bool, pass_: str) -> float:
    """Few queries over many keys, bottom-right causal: exactly the visible pairs."""
    _check_pass(pass_)
    s = shape
    pairs = s.seq_q * s.seq_k
    if causal:
        seen = min(s.seq_q, s.seq_k)
        pairs -= seen * (seen - 1) // 2 + (s.seq_q - seen) * s.seq_k
    return 2.0 * s.batch * s.heads_q * pairs * (s.head_dim + s.head_dim_v) * _SOFTMAX_PASS[pass_]


def cross_flops(shape: Shape, causal: bool, pass_: str) -> float:
    """Cross-attention is never causal."""
    return softmax_flops(shape, False, pass_)


def linear_flops(shape: Shape, causal: bool, pass_: str) -> float:
    """Chunked linear attention (module docstring), chunk ``min(64, S)``."""
    _check_pass(pass_)
    s = shape
    f, dv = s.head_dim, s.head_dim_v
    per_token = 2 * f * dv * 2
    if causal:
        per_token += min(LINEAR_CHUNK, s.seq_q) * (f + dv) * 2
    return float(s.batch * s.heads_q * s.seq_q * per_token) * _LINEAR_PASS[pass_]


FLOPS = {"softmax": softmax_flops, "decode": decode_flops, "cross": cross_flops, "linear": linear_flops}


def flops(family: str, shape: Shape, causal: bool, pass_: str) -> float:
    return FLOPS[family](shape, causal, pass_)


def io_bytes(shape: Shape, element_size: int, pass_: str) -> float:
    """Least bytes moved (module docstring)."""
    _check_pass(pass_)
    s = shape
    q = s.batch * s.heads_q * s.seq_q * s.head_dim
    k = s.batch * s.heads_kv * s.seq_k * s.head_dim
    v = s.batch * s.heads_kv * s.seq_k * s.head_dim_v
    out = s.batch * s.heads_q * s.seq_q * s.head_dim_v
    forward = q + k + v + out
    backward = 2 * (q + k + v + out)  # reads q, k, v, out, dout; writes dq, dk, dv
    elements = {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[pass_]
    return float(elements * element_size)
