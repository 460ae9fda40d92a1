"""`pyattn.explain`: which backend and kernel a call would run on, without running it."""
from __future__ import annotations

from typing import Callable, Union

from .dispatch import Plan
from .ops import cross, linear, sdpa, softmax, sparse


def _plan_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    q, k, v, kwargs, _ = sdpa._to_attention_args(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                 enable_gqa)
    return softmax._plan_attention(q, k, v, **kwargs)


def _plan_topk(*args, **kwargs) -> Plan:
    (select, attend), _ = sparse._plan_topk_attention(*args, **kwargs)
    return Plan("topk_attention", attend.backend, f"{select.kernel}, then {attend.kernel}",
                select.passed_over + attend.passed_over)


_PLANNERS = {
    softmax.attention: softmax._plan_attention,
    softmax.attention_varlen: softmax._plan_attention_varlen,
    sdpa.scaled_dot_product_attention: _plan_sdpa,
    linear.linear_attention: linear._plan_linear_attention,
    sparse.block_sparse_attention: sparse._plan_block_sparse_attention,
    sparse.topk_attention: _plan_topk,
    cross.cross_attention: cross._plan_cross_attention,
}
_BY_NAME = {f.__name__: f for f in _PLANNERS}


def explain(op: Union[Callable, str], *args, **kwargs) -> Plan:
    """The `Plan` (backend, kernel, and why faster backends were passed over) for ``op(*args, **kwargs)``.

    ``op`` is a pyattn function or its name: ``pyattn.explain(pyattn.attention, q, k, v, causal=True)``.
    The arguments are checked as the call checks them before it runs its custom op (checks of
    tensor values, such as index ranges and signs, run inside the op, and so only in the call).
    """
    fn = _BY_NAME.get(op) if isinstance(op, str) else op
    if fn not in _PLANNERS:
        raise ValueError(f"op must be one of the pyattn functions {sorted(_BY_NAME)} (or its name), got {op!r}")
    plan = _PLANNERS[fn](*args, **kwargs)
    return plan if isinstance(plan, Plan) else plan[0]
