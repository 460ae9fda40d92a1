"""Linear-recurrent attention: `linear_attention`.

With ``qf = f(q) * scale`` and ``kf = f(k)`` (causal)::

    S_t = a_t S_{t-1} + kf_t^T v_t        z_t = a_t z_{t-1} + kf_t
    out_t = qf_t S_t / (qf_t . z_t + eps)         (qf_t S_t if not normalize)

``a_t = exp(log_decay_t)``. Non-causal: ``S = S_0 + sum_t kf_t^T v_t`` and
``z = z_0 + sum_t kf_t``, the same output formula for every t.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch, feature_maps, validation
from ._common import needs_grad, stat_dtype
from ._custom_op import DifferentiableOp

# Maps the kernels apply themselves; any other callable runs in PyTorch before the op.
_FUSED_MAPS = {"identity": "identity", "elu": "elu", "relu": "relu",
               feature_maps.ELU1: "elu", feature_maps.ReLU: "relu"}


def _fake_linear_attention(q, k, v, log_decay, state_s, state_z, *, feature_map, **params):
    b, hq, _, f = q.shape
    dtype = stat_dtype(q.dtype)
    return (q.new_empty((b, hq, q.shape[2], v.shape[-1])), q.new_empty((b, hq, f, v.shape[-1]), dtype=dtype),
            q.new_empty((b, hq, f), dtype=dtype))


def _check_log_decay(q, k, v, log_decay, state_s, state_z, **params):
    if log_decay is not None:
        validation.float_values_at_most("log_decay", log_decay, 0.0)


_LINEAR_ATTENTION = DifferentiableOp(
    "linear_attention", ("q", "k", "v", "log_decay", "state_s", "state_z"),
    [("causal", "bool"), ("feature_map", "str"), ("normalize", "bool"), ("scale", "float"), ("eps", "float")],
    3, _fake_linear_attention, _check_log_decay)


def _apply_feature_map(feature_map, q, k):
    """Returns (name of the fused map, q, k): a module or callable runs here, in PyTorch."""
    if isinstance(feature_map, str):
        if feature_map not in _FUSED_MAPS:
            raise ValueError(f"feature_map must be one of {['identity', 'elu', 'relu']}, a callable or a "
                             f"pyattn.feature_maps module, got {feature_map!r}")
        return feature_map, q, k
    if type(feature_map) in _FUSED_MAPS:
        return _FUSED_MAPS[type(feature_map)], q, k
    if not callable(feature_map):
        raise TypeError(f"feature_map must be a string, a callable or a module, got {type(feature_map).__name__}")
    if isinstance(feature_map, feature_maps.Favor) and feature_map.redraw and feature_map.training:
        feature_map.redraw_()  # once per call, so q and k share the random features
    qf, kf = feature_map(q), feature_map(k)
    for name, x, src in (("feature_map(q)", qf, q), ("feature_map(k)", kf, k)):
        validation.tensor(name, x, ndim=4, dtypes=(q.dtype,))
        if x.shape[:-1] != src.shape[:-1]:
            raise ValueError(f"{name} must keep the leading dims {tuple(src.shape[:-1])}, got {tuple(x.shape)}")
    if qf.shape[-1] != kf.shape[-1]:
        raise ValueError(f"feature_map(q) and feature_map(k) must have one feature dim, "
                         f"got {qf.shape[-1]} and {kf.shape[-1]}")
    return "identity", qf, kf


def _log_decay(log_decay, q) -> Optional[torch.Tensor]:
    """None, a float, (Hq,) or (B, Hq, S) -> None or a (B, Hq, S) tensor of the state dtype (a view)."""
    b, hq, s = q.shape[:3]
    if log_decay is None:
        return None
    dtype = stat_dtype(q.dtype)
    if isinstance(log_decay, (int, float)) and not isinstance(log_decay, bool):
        if not log_decay <= 0:  # also catches NaN
            raise ValueError(f"log_decay must be <= 0, got {log_decay}")
        return torch.full((), float(log_decay), dtype=dtype, device=q.device).expand(b, hq, s)
    validation.tensor("log_decay", log_decay, dtypes=validation.FLOAT_DTYPES)
    if log_decay.device != q.device:
        raise ValueError(f"log_decay must be on the device of q ({q.device}), got {log_decay.device}")
    if tuple(log_decay.shape) == (hq,):
        expanded = log_decay[None, :, None].expand(b, hq, s)
    elif tuple(log_decay.shape) == (b, hq, s):
        expanded = log_decay
    else:
        raise ValueError(f"log_decay must be a float, a (heads_q,) = ({hq},) tensor or a (batch, heads_q, seq) = "
                         f"({b}, {hq}, {s}) tensor, got shape {tuple(log_decay.shape)}")
    return expanded.to(dtype)


def _initial_state(initial_state, b, hq, f, dv, q):
    if initial_state is None:
        return None, None
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
        raise TypeError(f"initial_state must be a (S, z) tuple, got {type(initial_state).__name__}")
    dtype = stat_dtype(q.dtype)
    for name, x, shape in (("initial_state[0] (S)", initial_state[0], (b, hq, f, dv)),
                           ("initial_state[1] (z)", initial_state[1], (b, hq, f))):
        validation.tensor(name, x, dtypes=(dtype,))
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (batch, heads_q, feature_dim{', head_dim_v' * (len(shape) == 4)}), "
                             f"got {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")
    return initial_state[0], initial_state[1]


def _plan_linear_attention(q, k, v, *, causal=True, feature_map="elu", normalize=True, log_decay=None, scale=1.0,
                           eps=1e-6, initial_state=None, output_final_state=False, backend=None):
    validation.qkv(q, k, v)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k must have the sequence length of q ({q.shape[2]}) in linear attention, "
                         f"got {k.shape[2]}")
    causal = validation.flag("causal", causal)
    params = dict(causal=causal, normalize=validation.flag("normalize", normalize),
                  scale=validation.scale(scale, q.shape[-1]), eps=validation.nonnegative_float("eps", eps))
    validation.flag("output_final_state", output_final_state)
    name, qf, kf = _apply_feature_map(feature_map, q, k)
    decay = _log_decay(log_decay, q)
    if decay is not None and not causal:
        raise ValueError("log_decay needs causal=True: a decay orders the tokens, non-causal attention does not")
    s0, z0 = _initial_state(initial_state, q.shape[0], q.shape[1], qf.shape[-1], v.shape[-1], q)
    features = {n for n, used in (("causal", causal), ("decay", decay is not None),
                                  ("initial_state", s0 is not None)) if used}
    request = dispatch.Request("linear_attention", q.device, q.dtype, needs_grad(qf, kf, v, decay, s0, z0),
                               frozenset(features), qf.shape[-1], v.shape[-1],
                               (q.shape[0], q.shape[1], k.shape[1], q.shape[2]))
    return dispatch.choose(request, backend), (qf, kf, v, decay, s0, z0), dict(params, feature_map=name)


def linear_attention(q, k, v, *, causal=True, feature_map="elu", normalize=True, log_decay=None, scale=1.0,
                     eps=1e-6, initial_state=None, output_final_state=False, backend=None):
    """Linear attention (module docstring), q ``(B, Hq, S, D)``, k ``(B, Hkv, S, D)``, v ``(B, Hkv, S, Dv)``.

    ``feature_map``: "identity", "elu" (elu + 1), "relu", a callable, or a
    `pyattn.feature_maps` module; its feature dim F may differ from D.
    ``log_decay``: None, a float, ``(Hq,)`` or ``(B, Hq, S)``, all ``<= 0``.
    ``initial_state`` / the returned state: ``(S (B, Hq, F, Dv), z (B, Hq, F))``
    float32. Returns ``out (B, Hq, S, Dv)`` or ``(out, state)``.
    """
    plan, tensors, params = _plan_linear_attention(
        q, k, v, causal=causal, feature_map=feature_map, normalize=normalize, log_decay=log_decay, scale=scale,
        eps=eps, initial_state=initial_state, output_final_state=output_final_state, backend=backend)
    out, s, z = _LINEAR_ATTENTION(*tensors, backend=plan.backend, **params)
    return (out, (s, z)) if output_final_state else out
