"""The reference backend: `pyattn.reference` run as a backend.

It runs every op on any device and dtype. Forward calls the reference;
backward recomputes the reference under autograd and takes the vector-Jacobian
product, so its gradients are exactly those of the ground truth.

Every implementation has one of two signatures, shared with the other backends:
``forward(inputs, **params) -> outputs`` and
``backward(grads, inputs, outputs, needs, **params) -> grads of inputs``,
where `inputs` are the op's tensor inputs (None where absent), `needs` says
which of them want a gradient, and `params` are the op's plain arguments.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

from .. import reference as ref

NAME = "reference"
DEFAULT_OK = True


def unavailable() -> Optional[str]:
    return None


def cannot_run(request) -> Optional[str]:
    return None


def kernel(request) -> str:
    return f"pyattn.reference.{request.op} (plain PyTorch)"


def _seed(dropout_seed: Optional[torch.Tensor]) -> Optional[int]:
    return None if dropout_seed is None else int(dropout_seed.item())


def _fresh(outputs: Sequence[torch.Tensor], inputs: Sequence[Optional[torch.Tensor]]):
    """Custom ops may not return their inputs (or views of them): copy any that alias."""
    storages = {x.untyped_storage().data_ptr() for x in inputs if x is not None and x.numel()}
    return tuple(o.clone() if o.numel() and o.untyped_storage().data_ptr() in storages else o
                 for o in outputs)


def _forward(fn: Callable) -> Callable:
    def forward(inputs, **params):
        with torch.no_grad():
            return _fresh(fn(*inputs, **params), inputs)
    return forward


def _backward(fn: Callable) -> Callable:
    # torch.func.vjp, not torch.autograd.grad: custom-op implementations run with autograd
    # recording off, which enable_grad() does not undo; functorch's transform works there.
    def backward(grads, inputs, outputs, needs, **params):
        wrt = [i for i, (x, n) in enumerate(zip(inputs, needs)) if n and x is not None and x.is_floating_point()]

        def partial(*diff):
            full = list(inputs)
            for i, x in zip(wrt, diff):
                full[i] = x
            return tuple(fn(*full, **params))

        outs, vjp = torch.func.vjp(partial, *(inputs[i] for i in wrt))
        found = vjp(tuple(torch.zeros_like(o) if g is None else g.to(o.dtype) for o, g in zip(outs, grads)))
        result = [None] * len(inputs)
        for i, g in zip(wrt, found):
            result[i] = g
        return tuple(result)
    return backward


def _attention(q, k, v, attn_bias, *, dropout_seed, causal, scale, window_left, window_right,
               softcap, dropout_p) -> Tuple[torch.Tensor, torch.Tensor]:
    return ref.attention(q, k, v, causal=causal, scale=scale, window=(window_left, window_right),
                         softcap=softcap, attn_bias=attn_bias, dropout_p=dropout_p,
                         dropout_seed=_seed(dropout_seed), return_lse=True)


def _attention_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_seed,
                      causal, scale, window_left, window_right, softcap, dropout_p):
    return ref.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                causal=causal, scale=scale, window=(window_left, window_right),
                                softcap=softcap, dropout_p=dropout_p, dropout_seed=_seed(dropout_seed),
                                return_lse=True)


def _linear_attention(q, k, v, log_decay, state_s, state_z, *, causal, feature_map, normalize, scale, eps):
    initial = None if state_s is None else (state_s, state_z)
    out, (s, z) = ref.linear_attention(q, k, v, causal=causal, feature_map=feature_map, normalize=normalize,
                                       log_decay=log_decay, scale=scale, eps=eps, initial_state=initial,
                                       output_final_state=True)
    return out, s, z


def _block_sparse_attention(q, k, v, *, block_indices, block_size, causal, scale):
    return ref.block_sparse_attention(q, k, v, block_indices, block_size=block_size, causal=causal,
                                      scale=scale, return_lse=True)


def _cross_attention(q, k, v, *, kv_lengths, key_padding_mask, scale):
    return ref.cross_attention(q, k, v, kv_lengths=kv_lengths, key_padding_mask=key_padding_mask,
                               scale=scale, return_lse=True)


attention_forward = _forward(_attention)
attention_backward = _backward(_attention)
attention_varlen_forward = _forward(_attention_varlen)
attention_varlen_backward = _backward(_attention_varlen)
linear_attention_forward = _forward(_linear_attention)
linear_attention_backward = _backward(_linear_attention)
block_sparse_attention_forward = _forward(_block_sparse_attention)
block_sparse_attention_backward = _backward(_block_sparse_attention)
cross_attention_forward = _forward(_cross_attention)
cross_attention_backward = _backward(_cross_attention)


def topk_block_indices_forward(inputs, *, top_k, block_size, causal, scale, num_sink_blocks, num_local_blocks):
    q, k = inputs
    return (ref.topk_block_indices(q, k, top_k=top_k, block_size=block_size, causal=causal, scale=scale,
                                   num_sink_blocks=num_sink_blocks, num_local_blocks=num_local_blocks),)
