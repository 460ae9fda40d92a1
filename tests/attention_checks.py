"""Checks of `pyattn.attention` on one backend against the float64 reference and plain PyTorch in the
inputs' dtype, forward and backward (shared by the Triton and CUDA kernel tests).

Tolerance: `pyattn.testing.assert_close_relative`: the kernel's error against the float64 reference may
be at most `factor` times the error of plain PyTorch computing the same attention in the kernel's dtype
(`pyattn.reference._softmax_attention` on the un-upcast inputs), plus the dtype's atol. Every check also
requires the same NaN/inf pattern as the reference. Gradients include the gradient of lse.
"""
from __future__ import annotations

import torch

import pyattn
from pyattn import reference as ref
from pyattn.testing import assert_close_relative

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def make_qkv(b, hq, hkv, sq, sk, d, dv, dtype, *, layout="bhsd", seed=0, device=DEVICE):
    """q, k, v requiring grad; layout "bshd" is a (B, S, H, D) buffer seen through .transpose(1, 2)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(heads, seq, dim):
        shape = (b, seq, heads, dim) if layout == "bshd" else (b, heads, seq, dim)
        x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        x = x.transpose(1, 2) if layout == "bshd" else x
        return x.requires_grad_()

    return rand(hq, sq, d), rand(hkv, sk, d), rand(hkv, sk, dv)


def _loss(out, lse, g_out, g_lse):
    """A scalar that uses out and the finite part of lse: its gradient reaches both."""
    finite = torch.isfinite(lse)
    return (out.float() * g_out.float()).sum() + (torch.where(finite, lse, 0.0).float() * g_lse.float()).sum()


def _grads(out, lse, wrt, g_out, g_lse):
    wrt = [x for x in wrt if x is not None and x.requires_grad]
    return list(torch.autograd.grad(_loss(out, lse, g_out, g_lse), wrt, allow_unused=True))


def _dropout_keep(q, k, dropout_p, seed):
    if dropout_p == 0:
        return None
    return ref.dropout_keep_mask(seed, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), dropout_p, q.device)


def check_attention(q, k, v, *, backend, attn_bias=None, dropout_p=0.0, factor=2.0, **kw):
    """pyattn.attention(backend=backend) against the float64 reference and plain PyTorch in q's dtype:
    out, lse and the gradients of every input that requires grad."""
    scale = kw.pop("scale", q.shape[-1] ** -0.5)
    torch.manual_seed(1234)  # the dropout seed the op draws
    out, lse = pyattn.attention(q, k, v, attn_bias=attn_bias, dropout_p=dropout_p, scale=scale, return_lse=True,
                                backend=backend, **kw)
    torch.manual_seed(1234)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    gen = torch.Generator().manual_seed(7)
    g_out = torch.randn(out.shape, generator=gen).to(out)
    g_lse = torch.randn(lse.shape, generator=gen).to(lse)
    inputs = [q, k, v, attn_bias if attn_bias is not None and attn_bias.requires_grad else None]

    doubles = [None if x is None else x.detach().double().requires_grad_(x.requires_grad) for x in inputs]
    bias64 = attn_bias if attn_bias is None or attn_bias.dtype == torch.bool else attn_bias.detach().double()
    bias64 = doubles[3] if doubles[3] is not None else bias64
    ref_out, ref_lse = ref.attention(*doubles[:3], attn_bias=bias64, dropout_p=dropout_p, dropout_seed=seed,
                                     scale=scale, return_lse=True, **kw)
    # plain PyTorch in the kernel's dtype, no upcast: the error budget
    lows = [None if x is None else x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    bias_low = lows[3] if lows[3] is not None else attn_bias
    window = kw.get("window", (-1, -1))
    base_out, base_lse = ref._softmax_attention(
        *lows[:3], scale=scale, causal=kw.get("causal", False), window=tuple(window), softcap=kw.get("softcap", 0.0),
        attn_bias=bias_low, keep=_dropout_keep(q, k, dropout_p, seed), dropout_p=dropout_p)

    assert_close_relative(out, ref_out, base_out, name="out", factor=factor)
    assert_close_relative(lse, ref_lse, base_lse, name="lse", factor=factor, floor=2e-5)
    if not any(x is not None and x.requires_grad for x in inputs):
        return out, lse
    grads = _grads(out, lse, inputs, g_out, g_lse)
    ref_grads = _grads(ref_out, ref_lse, doubles, g_out.double(), g_lse.double())
    base_grads = _grads(base_out, base_lse, lows, g_out, g_lse)
    names = [n for n, x in zip(["dq", "dk", "dv", "dbias"], inputs) if x is not None and x.requires_grad]
    for name, g, r, bl in zip(names, grads, ref_grads, base_grads):
        assert g is not None and g.shape == r.shape, name
        assert_close_relative(g, r, bl, name=name, factor=factor)
    return out, lse


# --------------------------------------------------------------------------- linear attention

# the floor of the linear checks: a few units of the dtype's rounding relative to the largest reference value
# (the kernels multiply half operands on tensor cores; the upcast reference does not)
LINEAR_REL_FLOOR = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5}


def linear_run(fn, q, k, v, g, state, grads, **kw):
    """out, final S and z of `fn` (pyattn.linear_attention or the reference), then the gradients of the
    leaves that require grad (q, k, v, log decay, initial state) for the output gradients `grads`."""
    out, (s, z) = fn(q, k, v, log_decay=g, initial_state=state, output_final_state=True, **kw)
    loss = (out.double() * grads[0]).sum() + (s.double() * grads[1]).sum() + (z.double() * grads[2]).sum()
    leaves = [x for x in (q, k, v, g, *(state or ())) if x is not None and x.requires_grad]
    return [out, s, z, *torch.autograd.grad(loss, leaves)]
