"""The Triton linear attention kernels (`pyattn.kernels.linear`), chunked and fused recurrent,
forward and backward, against the float64 reference `pyattn.reference.linear_attention`.

Without a GPU they run on CPU tensors under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) with 32-token chunks and 32-wide feature/value blocks, so the small shapes
here cross chunk, feature-block and value-block edges; bfloat16 and long sequences run in
tests/test_gpu.py.

Tolerance: `pyattn.testing.assert_close_relative`: the kernel's error against the float64
reference may be at most twice the error of the reference computed from the same inputs in their
own dtype (plain PyTorch; it upcasts half inputs to float32, so for them only the output's
rounding), plus a floor of ``REL_FLOOR[dtype] * max |reference|``: the kernels multiply half
operands on tensor cores (float32 accumulation), which costs a few units of the half dtype's
rounding that an upcast reference does not make. Checked: out, the final state, and the gradients
of q, k, v, the log decay and the initial state (the loss uses out and the final state).
Buffers the kernels should overwrite are NaN-poisoned (`poison_empty`).
"""
from __future__ import annotations

import pytest
import torch

import pyattn
from pyattn import feature_maps
from pyattn import reference as ref
from pyattn.dispatch import triton as triton_backend
from pyattn.testing import assert_close_relative

pytestmark = pytest.mark.skipif(triton_backend.unavailable() is not None,
                                reason=f"Triton backend: {triton_backend.unavailable()}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# a few units of each dtype's rounding, relative to the largest reference value
REL_FLOOR = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


# --------------------------------------------------------------------------- helpers

def make_qkv(b, hq, hkv, s, d, dv, dtype, *, layout="bhsd", seed=0, device=DEVICE):
    """q, k, v requiring grad; layout "bshd" is a (B, S, H, D) buffer seen through .transpose(1, 2)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(heads, dim):
        shape = (b, s, heads, dim) if layout == "bshd" else (b, heads, s, dim)
        x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        return (x.transpose(1, 2) if layout == "bshd" else x).requires_grad_()

    return rand(hq, d), rand(hkv, d), rand(hkv, dv)


def make_decay(kind, b, hq, s, *, seed=1, device=DEVICE):
    """None, a float, a (Hq,) tensor or a (B, Hq, S) tensor (some tokens decay hard) of log decays."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "float":
        return -0.1
    if kind == "head":
        return (-0.5 * torch.rand(hq, generator=gen)).to(device).requires_grad_()
    g = -0.3 * torch.rand(b, hq, s, generator=gen)
    g[..., ::5] -= 4.0  # near-resets: exp(b_i - b_j) spans many orders inside a chunk
    return g.to(device).requires_grad_()


def make_state(b, hq, f, dv, *, seed=2, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    s0 = torch.randn(b, hq, f, dv, generator=gen)
    z0 = 1.0 + torch.rand(b, hq, f, generator=gen)  # a positive normalizer, as features give
    return s0.to(device).requires_grad_(), z0.to(device).requires_grad_()


def _leaves(q, k, v, log_decay, initial_state, feature_map):
    leaves = {"q": q, "k": k, "v": v}
    if torch.is_tensor(log_decay):
        leaves["log_decay"] = log_decay
    if initial_state is not None:
        leaves["S0"], leaves["z0"] = initial_state
    if isinstance(feature_map, torch.nn.Module):
        leaves.update({f"map.{n}": p for n, p in feature_map.named_parameters()})
    return {n: x for n, x in leaves.items() if x.requires_grad}


def _run(fn, leaves, q, k, v, log_decay, initial_state, cotangents, **kw):
    """fn(...) -> out, (S, z), and the gradients of the leaves for sum(out*g_out) + sum(S*g_S) + sum(z*g_z)."""
    out, (s, z) = fn(q, k, v, log_decay=log_decay, initial_state=initial_state, output_final_state=True, **kw)
    g_out, g_s, g_z = cotangents
    loss = ((out.double() * g_out.double()).sum() + (s.double() * g_s.double()).sum()
            + (z.double() * g_z.double()).sum())
    grads = torch.autograd.grad(loss, list(leaves.values())) if leaves else []
    return out, s, z, grads


def _double(x):
    return x.detach().double().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x


def check_linear(q, k, v, *, log_decay=None, initial_state=None, feature_map="elu", factor=2.0, **kw):
    """pyattn.linear_attention(backend="triton") against the float64 reference and against the
    reference on the same inputs: out, final state and every gradient."""
    dtype = q.dtype
    leaves = _leaves(q, k, v, log_decay, initial_state, feature_map)
    gen = torch.Generator().manual_seed(7)
    b, hq, s = q.shape[:3]
    dv = v.shape[-1]
    f = feature_map.num_features if isinstance(feature_map, feature_maps.T2R) else q.shape[-1]
    cotangents = [torch.randn(shape, generator=gen).to(q.device)
                  for shape in ((b, hq, s, dv), (b, hq, f, dv), (b, hq, f))]

    out, st, zt, grads = _run(pyattn.linear_attention, leaves, q, k, v, log_decay, initial_state, cotangents,
                              feature_map=feature_map, backend="triton", **kw)
    assert out.dtype == dtype and st.dtype == torch.float32 and zt.dtype == torch.float32

    map64 = feature_map
    if isinstance(feature_map, torch.nn.Module):  # the same module in float64, for the truth
        map64 = type(feature_map)(feature_map.head_dim, feature_map.num_features).double()
        map64.load_state_dict(feature_map.state_dict())
    dbl = {n: _double(x) for n, x in leaves.items()}
    state64 = None if initial_state is None else (dbl.get("S0", _double(initial_state[0])),
                                                    dbl.get("z0", _double(initial_state[1])))
    decay64 = dbl.get("log_decay", log_decay)
    leaves64 = dict(dbl)
    if map64 is not feature_map:
        leaves64.update({f"map.{n}": p for n, p in map64.named_parameters()})
    leaves64 = {n: leaves64[n] for n in leaves}
    ref_out, ref_s, ref_z, ref_grads = _run(ref.linear_attention, leaves64, dbl["q"] if "q" in dbl else _double(q),
                                            dbl.get("k", _double(k)), dbl.get("v", _double(v)), decay64, state64,
                                            cotangents, feature_map=map64, **kw)
    base_out, base_s, base_z, base_grads = _run(ref.linear_attention, leaves, q, k, v, log_decay, initial_state,
                                                cotangents, feature_map=feature_map, **kw)

    def close(name, actual, expected, baseline):
        assert actual.shape == expected.shape, f"{name}: {tuple(actual.shape)} != {tuple(expected.shape)}"
        floor = REL_FLOOR[dtype] * (expected.abs().max().item() if expected.numel() else 0.0) + 1e-6
        assert_close_relative(actual, expected, baseline, name=name, factor=factor, floor=floor)

    close("out", out, ref_out, base_out)
    close("S", st, ref_s, base_s)
    close("z", zt, ref_z, base_z)
    for name, g, r, bl in zip(leaves, grads, ref_grads, base_grads):
        close(f"d{name}", g, r, bl)
    return out, (st, zt)


# --------------------------------------------------------------------------- grid

# name: (B, Hq, Hkv, S, D, Dv, layout, decay, initial_state, kwargs). Lengths 1, 7, 33, 70 are not
# multiples of the 32-token chunk; S <= 16 runs the fused recurrent forward (backward: chunked).
CASES = {
    "causal-elu": (1, 2, 2, 70, 16, 16, "bhsd", "none", False, {}),
    "token-decay-init-gqa": (1, 2, 1, 70, 32, 48, "bshd", "token", True, {}),
    "head-decay-relu-unnormalized": (1, 2, 1, 33, 48, 16, "bhsd", "head", True,
                                     dict(feature_map="relu", normalize=False)),
    "float-decay-identity-unnormalized-D5": (1, 2, 2, 33, 5, 24, "bshd", "float", False,
                                          dict(feature_map="identity", normalize=False, scale=0.25)),
    "noncausal-init-gqa": (1, 4, 2, 70, 16, 32, "bshd", "none", True, dict(causal=False)),
    "noncausal-relu-unnormalized": (2, 2, 1, 33, 40, 16, "bhsd", "none", False,
                                    dict(causal=False, feature_map="relu", normalize=False)),
    "recurrent-S7-token-decay-init": (2, 2, 1, 7, 16, 16, "bhsd", "token", True, dict(scale=0.5)),
    "decode-S1-token-decay-init": (1, 4, 2, 1, 32, 32, "bshd", "token", True, {}),
    "noncausal-S1": (1, 2, 2, 1, 16, 16, "bhsd", "none", False, dict(causal=False)),
}


def case_id(name, case, dtype):
    b, hq, hkv, s, d, dv = case[:6]
    heads = f"H{hq}" if hq == hkv else f"H{hq}/{hkv}"
    return f"{name}-B{b}-{heads}-S{s}-D{d}-Dv{dv}-{case[6]}-{DTYPE_IDS[dtype]}"


GRID = ([(name, torch.float32) for name in CASES]
        + [(name, torch.float16) for name in ("token-decay-init-gqa", "noncausal-relu-unnormalized",
                                              "recurrent-S7-token-decay-init")])


@pytest.mark.parametrize("name,dtype", GRID, ids=[case_id(n, CASES[n], d) for n, d in GRID])
def test_grid(name, dtype, poison_empty):
    b, hq, hkv, s, d, dv, layout, decay, init, kw = CASES[name]
    q, k, v = make_qkv(b, hq, hkv, s, d, dv, dtype, layout=layout)
    if layout == "bshd" and s > 1:
        assert not q.is_contiguous()
    initial_state = make_state(b, hq, d, dv) if init else None
    check_linear(q, k, v, log_decay=make_decay(decay, b, hq, s), initial_state=initial_state, **kw)


def test_module_feature_map_with_other_feature_dim(poison_empty):
    """T2R (learned relu(x W^T + b), 16 -> 24 features) runs in PyTorch and reaches the kernels as
    "identity" with F != D; its parameters get gradients through the kernels' dq, dk."""
    torch.manual_seed(0)
    fmap = feature_maps.T2R(16, 24)
    q, k, v = make_qkv(1, 2, 1, 33, 16, 16, torch.float32, layout="bshd")
    check_linear(q, k, v, feature_map=fmap, log_decay=make_decay("token", 1, 2, 33),
                 initial_state=make_state(1, 2, 24, 16))


def test_bfloat16(poison_empty):
    """bfloat16 tl.dot is upcast under the interpreter (triton#11584); on a GPU it is native."""
    q, k, v = make_qkv(1, 2, 1, 40, 16, 16, torch.bfloat16)
    check_linear(q, k, v, log_decay=make_decay("token", 1, 2, 40), initial_state=make_state(1, 2, 16, 16))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_empty_sequence(causal, poison_empty):
    """seq == 0: an empty output, the initial state passed through (zeros without one), and its
    gradient is the final state's."""
    q, k, v = make_qkv(2, 2, 1, 0, 16, 8, torch.float32)
    s0, z0 = make_state(2, 2, 16, 8)
    out, (s, z) = pyattn.linear_attention(q, k, v, causal=causal, initial_state=(s0, z0), output_final_state=True,
                                          backend="triton")
    assert out.shape == (2, 2, 0, 8)
    assert torch.equal(s, s0) and torch.equal(z, z0) and s.data_ptr() != s0.data_ptr()
    g_s, g_z = torch.randn_like(s), torch.randn_like(z)
    dq, ds0, dz0 = torch.autograd.grad((s * g_s).sum() + (z * g_z).sum(), [q, s0, z0])
    assert dq.shape == q.shape and torch.equal(ds0, g_s) and torch.equal(dz0, g_z)
    _, (s, z) = pyattn.linear_attention(q, k, v, causal=causal, output_final_state=True, backend="triton")
    assert not s.any() and not z.any()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_recurrent_forward_and_no_final_state_grads(causal, poison_empty):
    """The fused recurrent forward equals the chunked one; the backward with no gradient for the
    returned state (grads[1], grads[2] None) equals the one with zero gradients."""
    from pyattn.launchers import triton_linear

    q, k, v = (x.detach() for x in make_qkv(1, 2, 1, 20, 16, 16, torch.float32))
    g = make_decay("token", 1, 2, 20).detach() if causal else None
    s0, z0 = (x.detach() for x in make_state(1, 2, 16, 16))
    params = dict(causal=causal, feature_map="elu", normalize=True, scale=0.5, eps=1e-6)
    inputs = (q, k, v, g, s0, z0)
    out, s, z = triton_backend.linear_attention_forward(inputs, **params)  # S = 20 > 16: chunked
    fused = [torch.empty_like(x) for x in (out, s, z)]
    triton_linear.linear_forward(*inputs, *fused, recurrent=True, **params)
    for a, e in zip(fused, (out, s, z)):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=2e-5)
    dout = torch.randn_like(out)
    needs = (True, True, True, g is not None, True, True)
    none = triton_backend.linear_attention_backward((dout, None, None), inputs, (out, s, z), needs, **params)
    zero = triton_backend.linear_attention_backward((dout, torch.zeros_like(s), torch.zeros_like(z)), inputs,
                                                    (out, s, z), needs, **params)
    for a, e in zip(none, zero):
        assert (a is None) == (e is None)
        if a is not None:
            torch.testing.assert_close(a, e, atol=0, rtol=0)


def test_without_final_state(poison_empty):
    """output_final_state=False returns only out; its gradients are those of the same call whose
    returned state is not used."""
    q, k, v = make_qkv(1, 2, 1, 20, 16, 16, torch.float32)
    g = make_decay("token", 1, 2, 20)
    out = pyattn.linear_attention(q, k, v, log_decay=g, backend="triton")
    assert torch.is_tensor(out) and out.shape == (1, 2, 20, 16)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), [q, k, v, g])
    out2, _ = pyattn.linear_attention(q, k, v, log_decay=g, output_final_state=True, backend="triton")
    grads2 = torch.autograd.grad((out2 * dout).sum(), [q, k, v, g])
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    for a, e in zip(grads, grads2):
        torch.testing.assert_close(a, e, atol=0, rtol=0)
    out64 = ref.linear_attention(*(x.detach().double() for x in (q, k, v)), log_decay=g.detach().double())
    torch.testing.assert_close(out.double(), out64, atol=2e-5, rtol=2e-4)


# --------------------------------------------------------------------------- chunked == recurrent == stepwise

def _pieces(fn, q, k, v, g, state, bounds, **kw):
    """fn over the tokens split at `bounds`, passing the state along: out (concatenated) and the state."""
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out, state = fn(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], log_decay=g[:, :, lo:hi],
                        initial_state=state, output_final_state=True, **kw)
        outs.append(out)
    return torch.cat(outs, 2), state


def test_chunked_equals_recurrent_equals_stepwise(monkeypatch):
    """One sequence run whole (chunked kernels), in two halves passing the state (chunked, then the
    fused loop for the short half), one token at a time (the decoding step), and whole through the
    fused loop forced: all equal, and equal to the reference's token loop."""
    from pyattn.launchers import triton_linear

    s = 36
    q, k, v = (x.detach() for x in make_qkv(1, 2, 1, s, 16, 16, torch.float32, layout="bshd"))
    g = make_decay("token", 1, 2, s).detach()
    state = tuple(x.detach() for x in make_state(1, 2, 16, 16))
    kw = dict(scale=0.5, backend="triton")
    whole = _pieces(pyattn.linear_attention, q, k, v, g, state, [0, s], **kw)
    halves = _pieces(pyattn.linear_attention, q, k, v, g, state, [0, 21, s], **kw)
    steps = _pieces(pyattn.linear_attention, q, k, v, g, state, list(range(s + 1)), **kw)
    monkeypatch.setattr(triton_linear, "RECURRENT_MAX_SEQ", 1 << 30)
    fused = _pieces(pyattn.linear_attention, q, k, v, g, state, [0, s], **kw)
    del kw["backend"]
    loop = _pieces(ref.linear_attention_recurrent, q.double(), k.double(), v.double(), g.double(),
                   tuple(x.double() for x in state), [0, s], **kw)
    for name, (out, (st, z)) in (("halves", halves), ("steps", steps), ("fused", fused), ("reference loop", loop)):
        for part, a, e in (("out", out, whole[0]), ("S", st, whole[1][0]), ("z", z, whole[1][1])):
            torch.testing.assert_close(a.float(), e, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name} {part}: {m}")


# --------------------------------------------------------------------------- blocks, strides, dispatch

@pytest.mark.parametrize("config", [dict(BT=16, BK=16, BV=16), dict(BT=64, BK=64, BV=64)], ids=["16", "64"])
def test_block_sizes(config, poison_empty):
    """Blocks other than the interpreter's 32s: one chunk for the whole input, and many small ones
    with two feature and two value blocks."""
    from pyattn.launchers import triton_linear

    q, k, v = (x.detach() for x in make_qkv(1, 2, 1, 40, 24, 20, torch.float32))
    g = make_decay("token", 1, 2, 40).detach()
    s0, z0 = (x.detach() for x in make_state(1, 2, 24, 20))
    params = dict(causal=True, feature_map="relu", normalize=True, scale=0.5, eps=1e-6)
    out, s, z = torch.empty(1, 2, 40, 20), torch.empty(1, 2, 24, 20), torch.empty(1, 2, 24)
    triton_linear.linear_forward(q, k, v, g, s0, z0, out, s, z, recurrent=False, config=config, **params)
    grads = [torch.empty_like(x) for x in (q, k, v, g, s0, z0)]
    dout, ds, dz = torch.randn_like(out), torch.randn_like(s), torch.randn_like(z)
    triton_linear.linear_backward(dout, ds, dz, q, k, v, g, s0, z0, out, s, z, *grads, config=config, **params)

    inputs64 = [x.double().requires_grad_() for x in (q, k, v, g, s0, z0)]
    want, (want_s, want_z) = ref.linear_attention(*inputs64[:3], log_decay=inputs64[3], scale=0.5, feature_map="relu",
                                                  initial_state=tuple(inputs64[4:]), output_final_state=True)
    loss = (want * dout.double()).sum() + (want_s * ds.double()).sum() + (want_z * dz.double()).sum()
    want_grads = torch.autograd.grad(loss, inputs64)
    for name, a, e in zip(["out", "S", "z", "dq", "dk", "dv", "dlog_decay", "dS0", "dz0"], (out, s, z, *grads),
                          (want, want_s, want_z, *want_grads)):
        torch.testing.assert_close(a.double(), e, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_noncontiguous_state_and_expanded_decay(poison_empty):
    """A transposed initial state and a log decay broadcast over batch and tokens (stride 0) are read
    through their strides; only some inputs need gradients."""
    q, k, v = make_qkv(2, 2, 2, 33, 16, 16, torch.float32, layout="bshd")
    k.requires_grad_(False)
    s0 = torch.randn(2, 2, 16, 16).transpose(-1, -2).requires_grad_()
    z0 = (1.0 + torch.rand(2, 16, 2)).transpose(1, 2)
    per_head = -torch.rand(2)
    assert s0.stride()[-1] != 1 and z0.stride()[-1] != 1
    check_linear(q, k, v, log_decay=per_head, initial_state=(s0, z0))


def test_backend_choice(no_default_backend):
    q, k, v = (x.detach() for x in make_qkv(1, 2, 2, 5, 16, 16, torch.float32, device="cpu"))
    if not torch.cuda.is_available():
        # the interpreter runs only when named: backend=None takes another path on CPU tensors
        plan = pyattn.explain(pyattn.linear_attention, q, k, v)
        assert plan.backend != "triton" and "interpreter" in dict(plan.passed_over)["triton"]
    plan = pyattn.explain(pyattn.linear_attention, q, k, v, backend="triton")
    assert plan.backend == "triton" and "chunked" in plan.kernel and "recurrent" in plan.kernel
    with pytest.raises(NotImplementedError, match="float16/bfloat16/float32"):
        pyattn.linear_attention(*(x.double() for x in (q, k, v)), backend="triton")


def test_opcheck(no_default_backend):
    """On the Triton backend the custom op passes opcheck's schema and fake-tensor checks (outputs
    alias no input, the fake matches). Tracing with torch.compile does not depend on the backend:
    tests/test_compile.py covers it."""
    from pyattn.ops import linear

    q, k, v = (x.detach().requires_grad_() for x in make_qkv(2, 4, 2, 9, 16, 16, torch.float32))
    g = -torch.rand(2, 4, 9, device=DEVICE)
    torch.library.opcheck(linear._LINEAR_ATTENTION.forward_op,
                          (q, k, v, g, None, None, True, "elu", True, 0.5, 1e-6, "triton"),
                          test_utils=("test_schema", "test_faketensor"))
