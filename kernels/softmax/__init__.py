"""Softmax attention kernels (shared/API.md section 1).

* ``forward``: flash-attention-2 forward, dense and varlen (``attention_forward_kernel``), and
  the fill of varlen rows that belong to no sequence (``fill_tail_kernel``);
* ``backward``: delta preprocess, dK/dV (one program per key block, looping over the query
  heads of its GQA group: no atomics) and dQ (which also writes dS for a bias gradient);
* ``_common``: block ranges (skipped / masked / unmasked key blocks), masks, dropout draw;
* ``decode``: flash-decoding forward (few queries, keys split across programs).

Launched by ``pyattn.launchers.triton_softmax`` / ``triton_decode``. Importing this package
imports no Triton; the modules do.
"""
