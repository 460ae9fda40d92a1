"""Plain-PyTorch baselines that are not references: a chunked linear attention.

The token loop baseline is `pyattn.reference.linear_attention_recurrent` itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def chunked_linear_attention(q, k, v, *, causal=True, chunk=64, eps=1e-6):
    """Normalised linear attention with the elu+1 feature map, in chunks, as a user would write it.

    q ``(B, Hq, S, D)``, k ``(B, Hkv, S, D)``, v ``(B, Hkv, S, Dv)`` -> ``(B, Hq, S, Dv)``. With
    ``qf = elu(q) + 1`` and ``kf = elu(k) + 1``, chunk ``n`` reads the state summed over the
    chunks before it (``qf_n S_{<n}``) and adds its own causal block
    ``tril(qf_n kf_n^T) v_n``; the normaliser is the same with a column of ones for v.
    Half-precision inputs compute in float32. O(S * chunk) memory, no S x S matrix.
    """
    dtype = q.dtype
    cdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    group = q.shape[1] // k.shape[1]
    qf = F.elu(q.to(cdt)) + 1
    kf = F.elu(k.to(cdt)) + 1
    vc = v.to(cdt)
    if group > 1:
        kf, vc = kf.repeat_interleave(group, dim=1), vc.repeat_interleave(group, dim=1)
    if not causal:
        state = kf.transpose(-1, -2) @ vc                                # (B, H, F, Dv)
        norm = kf.sum(-2)                                                 # (B, H, F)
        return ((qf @ state) / ((qf * norm[:, :, None]).sum(-1, keepdim=True) + eps)).to(dtype)
    b, h, s, f = qf.shape
    pad = (-s) % chunk
    if pad:  # zero features add nothing to any state or score
        qf, kf, vc = (F.pad(x, (0, 0, 0, pad)) for x in (qf, kf, vc))
    n = (s + pad) // chunk
    qc, kc, vv = (x.reshape(b, h, n, chunk, x.shape[-1]) for x in (qf, kf, vc))   # (B, H, N, C, *)
    mask = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~mask, 0.0)          # (B, H, N, C, C)
    kv = kc.transpose(-1, -2) @ vv                                        # (B, H, N, F, Dv)
    ksum = kc.sum(-2)                                                     # (B, H, N, F)
    # exclusive prefix sums: the state entering each chunk
    kv_before = kv.cumsum(2) - kv
    ksum_before = ksum.cumsum(2) - ksum
    num = scores @ vv + qc @ kv_before
    den = scores.sum(-1) + (qc @ ksum_before.unsqueeze(-1)).squeeze(-1)
    out = num / (den + eps).unsqueeze(-1)
    return out.reshape(b, h, n * chunk, -1)[:, :, :s].to(dtype)
