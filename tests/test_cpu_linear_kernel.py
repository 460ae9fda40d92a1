"""The C++ CPU linear-recurrent attention (pyattn._C, `backend="cpu"`), forward and backward,
against the float64 reference (`pyattn.reference.linear_attention`).

Rule: through the public API, the kernel's error against the float64 reference (outputs, final
state and every gradient: q, k, v, log_decay, initial state) is at most twice that of the
reference backend run in the kernel's dtype, plus that dtype's atol
(`pyattn.testing.assert_close_relative`). New buffers are NaN-poisoned (`poison_empty`), so
an element the kernel forgets to write fails. Chunked and token-by-token runs must agree to
float32 rounding.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch._dynamo  # noqa: F401  (before poison_empty: see tests/conftest.py)

import pyattn
from pyattn import _extension, feature_maps
from pyattn.testing import assert_close, assert_close_relative

C = _extension.load_cpu()
pytestmark = pytest.mark.skipif(C is None, reason=f"{_extension.cpu_unavailable_reason()}")

DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@contextlib.contextmanager
def forced_isa(name: str):
    previous = C.set_isa(name)
    try:
        yield
    finally:
        C.set_isa(previous)


def make(shape, dtype=torch.float32, *, layout="bhsd", seed=0, decay=None, init=False, grad=True):
    """Inputs of one case: shape (B, Hq, Hkv, S, D, Dv); decay None / "float" / "head" / "token";
    layout "bshd" gives (B, S, H, D) buffers seen through .transpose(1, 2) and non-contiguous states."""
    b, hq, hkv, s, d, dv = shape
    gen = torch.Generator().manual_seed(seed)

    def rand(*size, positive=False):
        x = torch.rand(*size, generator=gen) + 0.5 if positive else torch.randn(*size, generator=gen)
        return x

    def qkv(heads, dim):
        if layout == "bshd":
            return rand(b, s, heads, dim).transpose(1, 2)
        return rand(b, heads, s, dim)

    q, k, v = qkv(hq, d).to(dtype), qkv(hkv, d).to(dtype), qkv(hkv, dv).to(dtype)
    log_decay = None
    if decay == "float":
        log_decay = -0.05
    elif decay == "head":
        log_decay = -torch.rand(hq, generator=gen) * 0.3
    elif decay == "token":
        log_decay = -torch.rand(b, s, hq, generator=gen).transpose(1, 2) * 0.5  # non-contiguous too
    state = None
    if init:
        if layout == "bshd":
            s0 = rand(b, hq, dv, d).transpose(-1, -2)
        else:
            s0 = rand(b, hq, d, dv)
        state = (s0, rand(b, hq, d, positive=True) * s)
    tensors = [q, k, v]
    if torch.is_tensor(log_decay):
        tensors.append(log_decay)
    if state is not None:
        tensors += list(state)
    if grad:
        for x in tensors:
            x.requires_grad_(True)
    return q, k, v, log_decay, state


def as64(x):
    if x is None or isinstance(x, float):
        return x
    if isinstance(x, tuple):
        return tuple(as64(t) for t in x)
    return x.detach().double().requires_grad_(x.requires_grad)


def run(q, k, v, log_decay, state, *, backend, final=True, **kwargs):
    """[out, S, z (when final), gradients of every input that requires grad] for fixed upstream gradients."""
    res = pyattn.linear_attention(q, k, v, log_decay=log_decay, initial_state=state, output_final_state=final,
                                  backend=backend, **kwargs)
    outs = list((res[0], *res[1]) if final else (res,))
    gen = torch.Generator().manual_seed(123)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    wrt = [x for x in (q, k, v, log_decay, *(state or ())) if torch.is_tensor(x) and x.requires_grad]
    grads = list(torch.autograd.grad(loss, wrt)) if wrt and loss.requires_grad else []
    return outs + grads


def check(q, k, v, log_decay=None, state=None, *, final=True, factor=2.0, **kwargs):
    ours = run(q, k, v, log_decay, state, backend="cpu", final=final, **kwargs)
    ref64 = run(as64(q), as64(k), as64(v), as64(log_decay), as64(state), backend="reference", final=final, **kwargs)
    base = run(q, k, v, log_decay, state, backend="reference", final=final, **kwargs)
    assert len(ours) == len(ref64) == len(base)
    for i, (a, r, b) in enumerate(zip(ours, ref64, base)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert not torch.isnan(a).any(), f"result {i} has NaN"
        assert_close_relative(a, r, b, name=f"result {i}", factor=factor)
    return ours


def case_id(shape):
    b, hq, hkv, s, d, dv = shape
    heads = f"H{hq}" if hq == hkv else f"H{hq}/{hkv}"
    return f"B{b}-{heads}-S{s}-D{d}" + (f"-Dv{dv}" if dv != d else "")


# name: (kwargs of linear_attention, decay kind, initial state, output_final_state)
MODES = {
    "causal-elu": (dict(causal=True, feature_map="elu"), None, False, True),
    "causal-relu-decay_head-init": (dict(causal=True, feature_map="relu"), "head", True, True),
    "causal-elu-decay_token-init": (dict(causal=True, feature_map="elu", scale=0.5), "token", True, True),
    "causal-identity-unnormalized-decay_float": (dict(causal=True, feature_map="identity", normalize=False),
                                                 "float", False, False),
    "causal-elu-unnormalized-decay_token": (dict(causal=True, feature_map="elu", normalize=False), "token",
                                            False, True),
    "noncausal-elu-init": (dict(causal=False, feature_map="elu"), None, True, True),
    "noncausal-relu": (dict(causal=False, feature_map="relu"), None, False, False),
    "noncausal-identity-unnormalized-init": (dict(causal=False, feature_map="identity", normalize=False), None,
                                             True, True),
}
LENGTHS = [1, 7, 33, 70, 130]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("seq", LENGTHS, ids=lambda s: f"S{s}")
def test_matches_reference(seq, mode, poison_empty):
    kwargs, decay, init, final = MODES[mode]
    q, k, v, ld, st = make((2, 4, 2, seq, 16, 24), decay=decay, init=init, seed=seq)
    check(q, k, v, ld, st, final=final, **kwargs)


@pytest.mark.parametrize("mode", ["causal-elu", "causal-elu-decay_token-init", "noncausal-elu-init"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_half_precision(dtype, mode, poison_empty):
    kwargs, decay, init, final = MODES[mode]
    q, k, v, ld, st = make((1, 4, 2, 97, 32, 32), dtype, decay=decay, init=init, layout="bshd")
    check(q, k, v, ld, st, final=final, **kwargs)


@pytest.mark.parametrize("shape", [(1, 4, 1, 130, 64, 64), (2, 3, 3, 70, 80, 40), (1, 2, 2, 66, 3, 5)],
                         ids=case_id)
def test_shapes_and_layouts(shape, poison_empty):
    """MQA, head dims that fill no vector (3, 5, 40, 80), (B, S, H, D) views, non-contiguous states."""
    q, k, v, ld, st = make(shape, decay="token", init=True, layout="bshd")
    check(q, k, v, ld, st, causal=True, feature_map="elu")
    q, k, v, ld, st = make(shape, init=True, layout="bshd", seed=1)
    check(q, k, v, ld, st, causal=False, feature_map="relu")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_module_feature_map(causal, poison_empty, no_default_backend):
    """A module map (T2R, F=24 != D=16) runs in PyTorch; the kernel gets F-dim features ("identity")."""
    torch.manual_seed(0)
    fmap = feature_maps.T2R(16, 24)
    q, k, v, ld, st = make((1, 4, 2, 75, 16, 20), decay="head" if causal else None, init=False)
    state = (torch.randn(1, 4, 24, 20, requires_grad=True), torch.rand(1, 4, 24).add(1).requires_grad_(True))
    ours = check(q, k, v, ld, state, causal=causal, feature_map=fmap)
    assert ours[1].shape == (1, 4, 24, 20)
    plan = pyattn.explain(pyattn.linear_attention, q, k, v, causal=causal, feature_map=fmap)
    assert plan.backend == "cpu", plan


@pytest.mark.parametrize("isa", C.supported_isas() if C is not None else [])
def test_every_instruction_set(isa, poison_empty):
    """Each compiled variant this CPU runs (AVX-512, AVX2, portable)."""
    with forced_isa(isa):
        assert C.current_isa() == isa
        q, k, v, ld, st = make((1, 4, 2, 150, 40, 24), decay="token", init=True, layout="bshd")
        check(q, k, v, ld, st, causal=True, feature_map="elu")
        check(*make((1, 2, 2, 3, 16, 16), decay="head", init=True), causal=True, feature_map="relu")
        check(*make((1, 2, 1, 70, 16, 8), init=True), causal=False, feature_map="elu")


def test_long_sequence_strong_decay(poison_empty):
    """Many chunks; a strong per-token decay (weights far below float32's range inside a chunk)."""
    q, k, v, _, st = make((1, 2, 2, 600, 32, 32), init=True)
    ld = (-torch.rand(1, 2, 600) * 30).requires_grad_(True)
    check(q, k, v, ld, st, causal=True, feature_map="elu")


def test_chunked_equals_token_by_token():
    """Whole sequence == two halves passing the state == one token at a time (the decoding step)."""
    q, k, v, ld, st = make((1, 4, 2, 150, 32, 32), decay="token", init=True, grad=False)
    kw = dict(causal=True, feature_map="elu", backend="cpu", output_final_state=True)
    out, (s, z) = pyattn.linear_attention(q, k, v, log_decay=ld, initial_state=st, **kw)

    def part(lo, hi, state):
        return pyattn.linear_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], log_decay=ld[:, :, lo:hi],
                                       initial_state=state, **kw)

    out_a, state_a = part(0, 77, st)
    out_b, (s2, z2) = part(77, 150, state_a)
    assert_close(torch.cat([out_a, out_b], 2), out, name="halves out")
    assert_close(s2, s, name="halves S", factor=2)
    assert_close(z2, z, name="halves z", factor=2)
    state, outs = st, []
    for t in range(150):
        o, state = part(t, t + 1, state)
        outs.append(o)
    assert_close(torch.cat(outs, 2), out, name="tokens out", factor=2)
    assert_close(state[0], s, name="tokens S", factor=2)
    assert_close(state[1], z, name="tokens z", factor=2)


def test_decoding_step_keeps_memory_constant():
    """seq == 1 with a state: the output state has the state's shape, whatever the tokens seen."""
    q, k, v, _, st = make((1, 8, 8, 1, 64, 64), init=True, grad=False)
    out, (s, z) = pyattn.linear_attention(q, k, v, initial_state=st, output_final_state=True, backend="cpu")
    assert out.shape == (1, 8, 1, 64) and s.shape == st[0].shape and z.shape == st[1].shape
    ref, (rs, rz) = pyattn.linear_attention(*(x.double() for x in (q, k, v)), initial_state=as64(st),
                                            output_final_state=True, backend="reference")
    assert_close(out, ref, torch.float32, name="out")
    assert_close(s, rs, torch.float32, name="S")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_empty_sequence(causal, poison_empty):
    """seq == 0: an empty output, the initial state as the final state, its gradient passed through."""
    q, k, v, _, st = make((2, 4, 2, 0, 16, 8), init=True)
    out, (s, z) = pyattn.linear_attention(q, k, v, causal=causal, initial_state=st, output_final_state=True,
                                          backend="cpu")
    assert out.shape == (2, 4, 0, 8)
    assert torch.equal(s, st[0]) and torch.equal(z, st[1])
    gs, gz = torch.randn_like(s), torch.randn_like(z)
    grads = torch.autograd.grad((s * gs).sum() + (z * gz).sum() + out.sum(), (q, k, v, *st))
    assert [g.shape for g in grads[:3]] == [q.shape, k.shape, v.shape]
    assert torch.equal(grads[3], gs) and torch.equal(grads[4], gz)
    out, (s, z) = pyattn.linear_attention(q, k, v, causal=causal, output_final_state=True, backend="cpu")
    assert not s.any() and not z.any()


def test_only_some_inputs_need_grad(poison_empty):
    q, k, v, ld, st = make((1, 2, 2, 40, 16, 16), decay="token", init=True, grad=False)
    v.requires_grad_(True)
    st[1].requires_grad_(True)
    check(q, k, v, ld, st, causal=True)


@pytest.mark.parametrize("backend", ["openmp", "pool"])
def test_thread_count_does_not_change_results(backend):
    """Heads are independent work items: any thread count gives bit-identical results."""
    q, k, v, ld, st = make((2, 4, 2, 130, 32, 32), decay="token", init=True, layout="bshd")
    previous = torch.get_num_threads()
    results = []
    try:
        C.use_own_pool_only(backend == "pool")
        for threads in (1, max(2, previous), 3):
            torch.set_num_threads(threads)
            results.append(run(q, k, v, ld, st, backend="cpu", causal=True))
    finally:
        C.use_own_pool_only(False)
        torch.set_num_threads(previous)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_backend_choice(no_default_backend):
    q, k, v, _, _ = make((1, 2, 2, 8, 16, 16), grad=False)
    from pyattn.ops import linear

    plan, _, _ = linear._plan_linear_attention(q, k, v)
    assert plan.backend == "cpu", plan
    plan, _, _ = linear._plan_linear_attention(q.double(), k.double(), v.double())
    assert plan.backend == "reference", plan
    plan, _, _ = linear._plan_linear_attention(q.requires_grad_(), k, v, log_decay=-0.1,
                                               initial_state=(torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16)))
    assert plan.backend == "cpu", plan
    plan, _, _ = linear._plan_linear_attention(q, k, v, feature_map=lambda x: x[..., :0])
    assert plan.backend == "reference", plan  # no features: nothing for the kernel to do


BAD_INPUTS = {
    "log_decay-positive": lambda q, k, v: dict(log_decay=0.5),
    "log_decay-shape": lambda q, k, v: dict(log_decay=torch.zeros(3)),
    "log_decay-noncausal": lambda q, k, v: dict(log_decay=-0.1, causal=False),
    "state-shape": lambda q, k, v: dict(initial_state=(torch.zeros(1, 2, 16, 15), torch.zeros(1, 2, 16))),
    "state-dtype": lambda q, k, v: dict(initial_state=(torch.zeros(1, 2, 16, 16, dtype=torch.float64),
                                                       torch.zeros(1, 2, 16))),
    "state-not-tuple": lambda q, k, v: dict(initial_state=torch.zeros(1, 2, 16, 16)),
    "feature_map-name": lambda q, k, v: dict(feature_map="softmax"),
    "k-length": lambda q, k, v: dict(k=k[:, :, :5]),
    "heads": lambda q, k, v: dict(k=k[:, :1].expand(1, 3, 8, 16), v=v[:, :1].expand(1, 3, 8, 16)),
    "dtype-mix": lambda q, k, v: dict(v=v.double()),
    "eps-negative": lambda q, k, v: dict(eps=-1.0),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_before_the_kernel(case):
    q, k, v, _, _ = make((1, 2, 2, 8, 16, 16), grad=False)
    kwargs = BAD_INPUTS[case](q, k, v)
    q, k, v = kwargs.pop("q", q), kwargs.pop("k", k), kwargs.pop("v", v)
    with pytest.raises((ValueError, TypeError)):
        pyattn.linear_attention(q, k, v, backend="cpu", **kwargs)


def test_binding_rejects_what_would_crash():
    """The raw binding refuses codes and sizes that would index out of range or divide by zero."""
    zero4, zero3 = (0, (0, 0, 0, 0)), (0, (0, 0, 0))
    for sizes, dtype, fmap in [((1, 2, 0, 4, 8, 8), 0, 0), ((1, 3, 2, 4, 8, 8), 0, 0), ((1, 2, 2, 4, 8, 8), 7, 0),
                               ((1, 2, 2, 4, 8, 8), 0, 9), ((1, 2, 2, -4, 8, 8), 0, 0)]:
        with pytest.raises(ValueError):
            args = C.LinearArgs(sizes=sizes, dtype=dtype, feature_map=fmap, causal=True, normalize=True,
                                scale=1.0, eps=1e-6)
            C.linear_forward(zero4, zero4, zero4, zero3, zero4, zero3, zero4, zero4, zero3, args=args,
                             num_threads=1)


def test_opcheck_and_compile(no_default_backend):
    """The custom op run by the cpu backend passes torch.library.opcheck and traces with torch.compile."""
    from pyattn.ops import linear

    q, k, v, ld, st = make((2, 4, 2, 9, 8, 8), decay="token", init=True)
    torch.library.opcheck(linear._LINEAR_ATTENTION.forward_op,
                          (q, k, v, ld, *st, True, "elu", True, 1.0, 1e-6, "cpu"))
    torch._dynamo.reset()

    def fn(q, k, v):
        return pyattn.linear_attention(q, k, v, log_decay=-0.1, backend="cpu")

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))


@pytest.mark.parametrize("mode", ["decay_token-init", "plain"])
def test_split_sequence_few_heads(mode, poison_empty):
    """Fewer heads than threads: the forward cuts each sequence into segments run in parallel
    (a state pass, then the outputs); results match the reference and one thread's run."""
    decay, init = ("token", True) if mode != "plain" else (None, False)
    q, k, v, ld, st = make((1, 1, 1, 1100, 32, 24), decay=decay, init=init, seed=5)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        split = check(q, k, v, ld, st, causal=True, feature_map="elu")
        torch.set_num_threads(1)
        single = run(q, k, v, ld, st, backend="cpu", causal=True, feature_map="elu")
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(split[:3], single[:3]):
        assert_close(a, b, torch.float32, name="split vs one thread")
