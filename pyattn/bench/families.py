"""The op families pyattn-bench times: their pyattn op, reference, inputs and defaults.

======== ============================== ====================================== ===========
family   pyattn op                      shapes                                 causal
======== ============================== ====================================== ===========
softmax  ``pyattn.attention``           ``Sq = Sk = S``                        either
linear   ``pyattn.linear_attention``    ``Sq = Sk = S``, elu feature map,      either
                                        normalised
decode   ``pyattn.attention``           ``Sq`` few (``--seqlen-q``, default    bottom-right
                                        1), ``Sk = S``
cross    ``pyattn.cross_attention``     ``Sq`` latents (default 256), ``Sk = S`` never
======== ============================== ====================================== ===========

decode and cross are memory-bound: their tables add GB/s (`pyattn.bench.flops.io_bytes`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict

import torch

import pyattn

from .case import Case


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    op: Callable            # the pyattn function
    reference: Callable     # (q, k, v, case) -> out, plain PyTorch (pyattn.reference)
    default_causal: bool
    causal_choices: tuple   # the causal values the family takes
    memory_bound: bool
    default_seqlen_q: int   # 0: seq_q follows seq (Sq = Sk = S)
    default_baselines: tuple  # the first of these that ran is the default --baseline

    def op_kwargs(self, case: Case) -> dict:
        """The keyword arguments of ``op`` (besides q, k, v and backend) for this case."""
        if self.name == "linear":
            return dict(causal=case.causal, feature_map="elu")
        if self.name == "cross":
            return {}
        return dict(causal=case.causal)


def _attention_reference(q, k, v, case):
    return pyattn.reference.attention(q, k, v, causal=case.causal)


def _linear_reference(q, k, v, case):
    return pyattn.reference.linear_attention(q, k, v, causal=case.causal, feature_map="elu")


def _cross_reference(q, k, v, case):
    return pyattn.reference.cross_attention(q, k, v)


_SDPA_BASELINES = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "pyattn-reference")

FAMILIES: Dict[str, Family] = {
    "softmax": Family("softmax", pyattn.attention, _attention_reference, False, (False, True), False, 0,
                      _SDPA_BASELINES),
    "linear": Family("linear", pyattn.linear_attention, _linear_reference, True, (False, True), False, 0,
                     ("fla-chunk", "torch-chunked", "torch-loop", "pyattn-reference")),
    "decode": Family("decode", pyattn.attention, _attention_reference, True, (False, True), True, 1,
                     _SDPA_BASELINES),
    "cross": Family("cross", pyattn.cross_attention, _cross_reference, False, (False,), True, 256,
                    _SDPA_BASELINES),
}


def make_inputs(case: Case, seed: int = 0):
    """q, k, v (B, H, S, D) on the case's device, requiring grad for backward passes; dout."""
    s = case.shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device=case.device, dtype=case.dtype)

    q = randn(s.batch, s.heads_q, s.seq_q, s.head_dim)
    k = randn(s.batch, s.heads_kv, s.seq_k, s.head_dim)
    v = randn(s.batch, s.heads_kv, s.seq_k, s.head_dim_v)
    dout = randn(s.batch, s.heads_q, s.seq_q, s.head_dim_v)
    for x in (q, k, v):
        x.requires_grad_(case.needs_grad)
    return q, k, v, dout
