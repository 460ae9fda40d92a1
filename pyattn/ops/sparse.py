"""Retrieval-sparse attention: `block_sparse_attention` and `topk_attention`.

Query block ``i`` holds queries ``[i*bs, (i+1)*bs)``, key block ``j`` keys
``[j*bs, (j+1)*bs)``. `block_sparse_attention` is softmax attention restricted
to the key blocks listed for each query block (and the bottom-right causal
mask). `topk_attention` picks those blocks: sinks, local blocks, and the
`top_k` blocks with the highest Quest bound
``max_{h in group, q in block} scale * sum_c max(q_c kmin_jc, q_c kmax_jc)``,
an upper bound of every logit the block's keys give the block's queries.
"""
from __future__ import annotations

import torch

from .. import dispatch, validation
from ._common import needs_grad, stat_dtype
from ._custom_op import DifferentiableOp


def _fake_block_sparse(q, k, v, **params):
    return (q.new_empty(q.shape[:-1] + (v.shape[-1],)),
            q.new_empty(q.shape[:-1], dtype=stat_dtype(q.dtype)))


def _check_block_indices(q, k, v, *, block_indices, block_size, **params):
    nkb = _num_blocks(k.shape[2], block_size)
    validation.int_values_in("block_indices", block_indices, -1, nkb - 1, f"-1 or a key block index < {nkb}")


_BLOCK_SPARSE = DifferentiableOp(
    "block_sparse_attention", ("q", "k", "v"),
    [("block_indices", "Tensor?"), ("block_size", "int"), ("causal", "bool"), ("scale", "float")],
    2, _fake_block_sparse, _check_block_indices)


def _num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def _selection_width(num_sink_blocks: int, num_local_blocks: int, top_k: int, num_kblocks: int) -> int:
    """Columns of the block index tensor: every kept block fits, and never more than there are blocks."""
    return min(num_sink_blocks + num_local_blocks + top_k, num_kblocks)


@torch.library.custom_op("pyattn::topk_block_indices", mutates_args=())
def _topk_block_indices(q: torch.Tensor, k: torch.Tensor, top_k: int, block_size: int, causal: bool, scale: float,
                        num_sink_blocks: int, num_local_blocks: int, backend: str) -> torch.Tensor:
    (indices,) = dispatch.get(backend).topk_block_indices_forward(
        (q, k), top_k=top_k, block_size=block_size, causal=causal, scale=scale, num_sink_blocks=num_sink_blocks,
        num_local_blocks=num_local_blocks)
    return indices.contiguous()


@_topk_block_indices.register_fake
def _(q, k, top_k, block_size, causal, scale, num_sink_blocks, num_local_blocks, backend):
    width = _selection_width(num_sink_blocks, num_local_blocks, top_k, _num_blocks(k.shape[2], block_size))
    return q.new_empty((q.shape[0], k.shape[1], _num_blocks(q.shape[2], block_size), width), dtype=torch.int32)


def _plan_block_sparse_attention(q, k, v, block_indices, *, block_size=64, causal=True, scale=None,
                                 return_lse=False, backend=None):
    _, hkv, d, dv = validation.qkv(q, k, v)
    block_size = validation.positive_int("block_size", block_size)
    causal = validation.flag("causal", causal)
    validation.flag("return_lse", return_lse)
    validation.tensor("block_indices", block_indices, ndim=4, dtypes=(torch.int32,))
    nqb = _num_blocks(q.shape[2], block_size)
    if tuple(block_indices.shape[:3]) != (q.shape[0], hkv, nqb):
        raise ValueError(f"block_indices must have shape (batch, heads_kv, ceil(seq_q / block_size), n_sel) = "
                         f"({q.shape[0]}, {hkv}, {nqb}, n_sel), got {tuple(block_indices.shape)}")
    if block_indices.device != q.device:
        raise ValueError(f"block_indices must be on the device of q ({q.device}), got {block_indices.device}")
    features = {"causal"} if causal else set()
    request = dispatch.Request("block_sparse_attention", q.device, q.dtype, needs_grad(q, k, v),
                               frozenset(features), d, dv)
    params = dict(block_size=block_size, causal=causal, scale=validation.scale(scale, d))
    return dispatch.choose(request, backend), params


def block_sparse_attention(q, k, v, block_indices, *, block_size=64, causal=True, scale=None, return_lse=False,
                           backend=None):
    """Softmax attention over the selected key blocks.

    q ``(B, Hq, Sq, D)``, k/v ``(B, Hkv, Sk, D/Dv)``; ``block_indices`` int32
    ``(B, Hkv, ceil(Sq / block_size), n_sel)``: key blocks per query block,
    -1 padded, any order, duplicates ignored. Returns out (and lse).
    """
    plan, params = _plan_block_sparse_attention(q, k, v, block_indices, block_size=block_size, causal=causal,
                                                scale=scale, return_lse=return_lse, backend=backend)
    out, lse = _BLOCK_SPARSE(q, k, v, backend=plan.backend, block_indices=block_indices, **params)
    return (out, lse) if return_lse else out


def _plan_topk_attention(q, k, v, *, top_k, block_size=64, causal=True, scale=None, num_sink_blocks=1,
                         num_local_blocks=1, return_block_indices=False, backend=None):
    _, _, d, dv = validation.qkv(q, k, v)
    params = dict(top_k=validation.positive_int("top_k", top_k, minimum=0),
                  block_size=validation.positive_int("block_size", block_size),
                  causal=validation.flag("causal", causal), scale=validation.scale(scale, d),
                  num_sink_blocks=validation.positive_int("num_sink_blocks", num_sink_blocks, minimum=0),
                  num_local_blocks=validation.positive_int("num_local_blocks", num_local_blocks, minimum=0))
    validation.flag("return_block_indices", return_block_indices)
    features = {"causal"} if causal else set()
    select = dispatch.choose(dispatch.Request("topk_block_indices", q.device, q.dtype, False,
                                              frozenset(features), d, dv), backend)
    attend = dispatch.choose(dispatch.Request("block_sparse_attention", q.device, q.dtype, needs_grad(q, k, v),
                                              frozenset(features), d, dv), backend)
    return (select, attend), params


def topk_attention(q, k, v, *, top_k, block_size=64, causal=True, scale=None, num_sink_blocks=1,
                   num_local_blocks=1, return_block_indices=False, backend=None):
    """Block top-k attention: select key blocks by their Quest bound, then `block_sparse_attention`.

    Each query block keeps the first ``num_sink_blocks`` key blocks, its
    ``num_local_blocks`` local blocks (the diagonal one and those before it)
    and the ``top_k`` other blocks with the highest bound (module docstring),
    chosen per kv-head group. With ``return_block_indices`` also returns the
    int32 ``(B, Hkv, ceil(Sq / block_size), n_sel)`` selection.
    """
    (select, attend), params = _plan_topk_attention(
        q, k, v, top_k=top_k, block_size=block_size, causal=causal, scale=scale, num_sink_blocks=num_sink_blocks,
        num_local_blocks=num_local_blocks, return_block_indices=return_block_indices, backend=backend)
    indices = _topk_block_indices(q.detach(), k.detach(), backend=select.backend, **params)
    out = _BLOCK_SPARSE(q, k, v, backend=attend.backend, block_indices=indices, block_size=params["block_size"],
                        causal=params["causal"], scale=params["scale"])[0]
    return (out, indices) if return_block_indices else out
