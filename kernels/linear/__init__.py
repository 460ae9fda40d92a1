"""Linear-recurrent attention kernels (shared/API.md section 2).

With ``qf = f(q) * scale``, ``kf = f(k)``, ``a_t = exp(g_t)`` (``g`` the log decay)::

    S_t = a_t S_{t-1} + kf_t^T v_t        z_t = a_t z_{t-1} + kf_t
    out_t = qf_t S_t / (qf_t . z_t + eps)          (qf_t S_t without normalize)

* ``chunk_state``: the state passed across chunks of BT tokens, forward (state before each
  chunk, final state) and backward (gradient of the state after each chunk, initial-state grad);
* ``chunk_output``: the forward output of one chunk: inter-chunk part from the state, intra-chunk
  part as a masked, decay-weighted matmul;
* ``chunk_grad``: the backward of one chunk: the normalizer's gradients (preprocess), dv, and
  dq / dk with the per-token log-decay gradient terms;
* ``recurrent``: a fused token loop (short inputs, the one-token decoding step);
* ``_common``: feature maps and their derivatives, in-chunk decay weights.

Launched by ``pyattn.launchers.triton_linear``. Importing this package imports no Triton; the
modules do.
"""
