"""The references in `pyattn.reference` against independent formulations written here.

Every comparison runs in float64: the naive versions below loop where the
references vectorize (per batch/head/query loops over explicit key lists,
explicit products of decays, Python-built masks), so agreement to ~1e-10 says
both compute what API.md specifies. Gradients are compared too, and every
reference passes `torch.autograd.gradcheck` on small shapes.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pyattn import feature_maps as fm
from pyattn import reference as ref

F64 = torch.float64
CLOSE = dict(atol=1e-10, rtol=1e-9)
NEG_INF = float("-inf")


# --------------------------------------------------------------------------- helpers

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def _strided(x: torch.Tensor) -> torch.Tensor:
    """A non-contiguous, differentiable view of x (B, H, S, D): the (B, S, H, D)
    layout of a wider buffer, as `qkv.view(...).transpose(1, 2)` gives."""
    width = x.shape[-1]
    wide = torch.cat([x, x], -1)
    return wide.transpose(1, 2).contiguous().transpose(1, 2)[..., :width]


def _grads(outputs, inputs, seed: int):
    """Gradients of a random linear function of `outputs` (-inf entries ignored)."""
    loss = 0.0
    for n, out in enumerate(outputs):
        weight = _randn(*out.shape, seed=seed + n, dtype=out.dtype)
        finite = torch.where(torch.isfinite(out), out, 0.0)
        loss = loss + (finite * weight).sum()
    wanted = [x for x in inputs if x is not None]
    if not (torch.is_tensor(loss) and loss.requires_grad):  # empty outputs: nothing depends on inputs
        return [torch.zeros_like(x) for x in wanted]
    found = torch.autograd.grad(loss, wanted, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(wanted, found)]


def _assert_all_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **(tol or CLOSE))


def _allowed(i: int, j: int, seq_q: int, seq_k: int, causal: bool, window) -> bool:
    offset = seq_k - seq_q
    left, right = window
    if causal and j > i + offset:
        return False
    if left >= 0 and j < i + offset - left:
        return False
    if right >= 0 and j > i + offset + right:
        return False
    return True


def naive_attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
                    attn_bias=None, keep=None, dropout_p=0.0):
    """Per (batch, head, query) loop over the explicit list of keys it may see."""
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    scale = dim ** -0.5 if scale is None else scale
    bias = None if attn_bias is None else attn_bias.expand(batch, q_heads, seq_q, seq_k)
    rows, lses = [], []
    for b in range(batch):
        for h in range(q_heads):
            g = h // (q_heads // kv_heads)
            for i in range(seq_q):
                keys = [j for j in range(seq_k) if _allowed(i, j, seq_q, seq_k, causal, window)]
                if bias is not None and bias.dtype == torch.bool:
                    keys = [j for j in keys if bool(bias[b, h, i, j])]
                if not keys:
                    rows.append(v.new_zeros(v.shape[-1]))
                    lses.append(torch.tensor(NEG_INF, dtype=q.dtype))
                    continue
                idx = torch.tensor(keys)
                s = (k[b, g, idx] @ q[b, h, i]) * scale
                if softcap > 0:
                    s = softcap * torch.tanh(s / softcap)
                if bias is not None and bias.dtype != torch.bool:
                    s = s + bias[b, h, i, idx]
                lse = torch.logsumexp(s, 0)
                p = torch.exp(s - lse)
                if keep is not None:
                    p = p * keep[b, h, i, idx] / (1 - dropout_p)
                rows.append(p @ v[b, g, idx])
                lses.append(lse)
    out = torch.stack(rows).reshape(batch, q_heads, seq_q, v.shape[-1]) if rows else \
        v.new_zeros(batch, q_heads, seq_q, v.shape[-1])
    lse = torch.stack(lses).reshape(batch, q_heads, seq_q) if lses else q.new_zeros(batch, q_heads, seq_q)
    return out, lse


# --------------------------------------------------------------------------- softmax attention

SHAPES = {  # B, Hq, Hkv, Sq, Sk, D, Dv
    "B1-H1/1-S1x1-D4": (1, 1, 1, 1, 1, 4, 4),
    "B2-H4/2-S5x9-D8-Dv6": (2, 4, 2, 5, 9, 8, 6),
    "B1-H3/1-S7x7-D5": (1, 3, 1, 7, 7, 5, 5),
    "B2-H2/2-S9x4-D4-Dv3": (2, 2, 2, 9, 4, 4, 3),
    "B1-H2/1-S0x5-D4": (1, 2, 1, 0, 5, 4, 4),
    "B1-H2/2-S3x0-D4": (1, 2, 2, 3, 0, 4, 4),
}

OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "window2,1": dict(window=(2, 1)),
    "window0,0": dict(window=(0, 0)),
    "window-1,0": dict(window=(-1, 0)),
    "causal-window3": dict(causal=True, window=(3, -1)),
    "softcap2-scale1.3": dict(softcap=2.0, scale=1.3),
    "bias-float": dict(bias="float"),
    "bias-bool": dict(bias="bool"),
    "causal-softcap-bias": dict(causal=True, softcap=1.5, bias="float"),
}


def _qkv(shape, seed, strided=True):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, dim_v = shape
    leaves = [_leaf(_randn(batch, q_heads, seq_q, dim, seed=seed)),
              _leaf(_randn(batch, kv_heads, seq_k, dim, seed=seed + 1)),
              _leaf(_randn(batch, kv_heads, seq_k, dim_v, seed=seed + 2))]
    views = [_strided(x) for x in leaves] if strided else leaves
    return leaves, views


def _bias(kind, shape, seed):
    batch, q_heads, _, seq_q, seq_k, _, _ = shape
    if kind == "float":  # broadcast over the batch
        return _leaf(_randn(1, q_heads, seq_q, seq_k, seed=seed))
    if kind == "bool":   # broadcast over the heads
        return torch.rand(batch, 1, seq_q, seq_k, generator=_gen(seed)) < 0.7
    return None


@pytest.mark.parametrize("opt", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_attention_matches_naive(shape, opt):
    options = dict(OPTIONS[opt])
    bias = _bias(options.pop("bias", None), shape, seed=7)
    leaves, (q, k, v) = _qkv(shape, seed=1)
    out, lse = ref.attention(q, k, v, attn_bias=bias, return_lse=True, **options)
    want_out, want_lse = naive_attention(q, k, v, attn_bias=bias, **options)

    assert out.shape == (shape[0], shape[1], shape[3], shape[6]) and lse.shape == out.shape[:3]
    assert out.dtype == F64 and lse.dtype == F64
    torch.testing.assert_close(out, want_out, **CLOSE)
    torch.testing.assert_close(lse, want_lse, **CLOSE)

    wrt = leaves + ([bias] if bias is not None and bias.requires_grad else [])
    got = _grads([out, lse], wrt, seed=11)
    want = _grads([want_out, want_lse], wrt, seed=11)
    _assert_all_close(got, want)
    assert all(torch.isfinite(g).all() for g in got)


def test_attention_bottom_right_causal_example():
    """Sq=2, Sk=4, causal: query 0 sees keys 0..2, query 1 sees 0..3; Sq > Sk rows see nothing."""
    q = torch.zeros(1, 1, 2, 2, dtype=F64)      # all scores 0 -> uniform over visible keys
    k = torch.zeros(1, 1, 4, 2, dtype=F64)
    v = torch.arange(4, dtype=F64).reshape(1, 1, 4, 1)
    out, lse = ref.attention(q, k, v, causal=True, return_lse=True)
    torch.testing.assert_close(out.flatten(), torch.tensor([1.0, 1.5], dtype=F64))
    torch.testing.assert_close(lse.flatten(), torch.log(torch.tensor([3.0, 4.0], dtype=F64)))

    out, lse = ref.attention(k, q, q, causal=True, return_lse=True)  # Sq=4, Sk=2
    assert torch.equal(out[0, 0, :2], torch.zeros(2, 2, dtype=F64))
    assert torch.isneginf(lse[0, 0, :2]).all() and torch.isfinite(lse[0, 0, 2:]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_attention_low_precision_dtypes(dtype):
    shape = (2, 4, 2, 6, 9, 8, 8)
    (q, k, v), _ = _qkv(shape, seed=3, strided=False)
    q, k, v = (x.detach().to(dtype) for x in (q, k, v))
    out, lse = ref.attention(q, k, v, causal=True, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    want_out, want_lse = ref.attention(*(x.to(F64) for x in (q, k, v)), causal=True, return_lse=True)
    torch.testing.assert_close(out.to(F64), want_out, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse.to(F64), want_lse, atol=1e-5, rtol=1e-5)


def test_attention_fully_masked_rows_have_finite_gradients():
    # Sq > Sk causal: the first rows see nothing; the bool bias empties one more row.
    leaves, (q, k, v) = _qkv((1, 2, 1, 5, 3, 4, 4), seed=5)
    bias = torch.ones(1, 1, 5, 3, dtype=torch.bool)
    bias[..., 4, :] = False
    out, lse = ref.attention(q, k, v, causal=True, attn_bias=bias, return_lse=True)
    assert torch.isneginf(lse[..., [0, 1, 4]]).all() and torch.isfinite(lse[..., 2:4]).all()
    assert torch.equal(out[..., [0, 1, 4], :], torch.zeros_like(out[..., [0, 1, 4], :]))
    # Backpropagate through lse including its -inf entries, as an autograd engine would.
    grads = torch.autograd.grad(out.sum() + lse.sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)

    # A float bias of -inf masks a row too; its gradient must stay finite.
    float_bias = _leaf(torch.zeros(1, 1, 5, 3, dtype=F64))
    blocked = float_bias.masked_fill(~bias, NEG_INF)
    out, lse = ref.attention(q, k, v, attn_bias=blocked, return_lse=True)
    grads = torch.autograd.grad(out.sum() + lse.sum(), leaves + [float_bias])
    assert torch.isneginf(lse[..., 4]).all()
    assert all(torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------- dropout

def test_dropout_keep_mask_is_deterministic_with_expected_rate():
    shape, p = (2, 4, 64, 64), 0.3
    a = ref.dropout_keep_mask(1234, shape, p, "cpu")
    b = ref.dropout_keep_mask(1234, shape, p, "cpu")
    c = ref.dropout_keep_mask(1235, shape, p, "cpu")
    assert a.dtype == torch.bool and a.shape == shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.float().mean().item() - (1 - p)) < 0.01
    assert ref.dropout_keep_mask(0, shape, 0.0, "cpu").all()
    # Philox4x32-10 known answer (Random123's kat_vectors: key 0, counter 0 -> first word 0x6627e8d5)
    assert int(ref.philox_uint32(0, torch.zeros(1, dtype=torch.int64))[0]) == 0x6627E8D5
    # Entry (b, h, i, j) draws counter ((b * H + h) * Sq + i) * Sk + j and keeps its top 24 bits >= p * 2**24
    b, h, i, j = 1, 2, 30, 41
    offset = ((b * shape[1] + h) * shape[2] + i) * shape[3] + j
    draw = int(ref.philox_uint32(1234, torch.tensor([offset]))[0])
    assert bool(a[b, h, i, j]) == ((draw >> 8) >= math.ceil(p * 2 ** 24))


def test_philox_uses_both_seed_and_offset_words():
    offsets = torch.tensor([0, 1, 2 ** 32, 2 ** 40 + 3], dtype=torch.int64)
    draws = ref.philox_uint32(7, offsets)
    assert len(set(draws.tolist())) == 4 and all(0 <= d < 2 ** 32 for d in draws.tolist())
    assert not torch.equal(draws, ref.philox_uint32(7 + 2 ** 32, offsets))  # the seed's high word counts


def test_attention_dropout():
    shape, p, seed = (2, 4, 2, 5, 9, 8, 6), 0.25, 99
    leaves, (q, k, v) = _qkv(shape, seed=2)
    out, lse = ref.attention(q, k, v, causal=True, dropout_p=p, dropout_seed=seed, return_lse=True)
    again = ref.attention(q, k, v, causal=True, dropout_p=p, dropout_seed=seed)
    other = ref.attention(q, k, v, causal=True, dropout_p=p, dropout_seed=seed + 1)
    plain, plain_lse = ref.attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out, again) and not torch.allclose(out, other)
    torch.testing.assert_close(lse, plain_lse, **CLOSE)  # lse is taken before dropout
    torch.testing.assert_close(ref.attention(q, k, v, causal=True, dropout_p=0.0, dropout_seed=seed),
                               plain, **CLOSE)

    keep = ref.dropout_keep_mask(seed, (2, 4, 5, 9), p, "cpu")
    want, _ = naive_attention(q, k, v, causal=True, keep=keep, dropout_p=p)
    torch.testing.assert_close(out, want, **CLOSE)
    _assert_all_close(_grads([out], leaves, seed=3), _grads([want], leaves, seed=3))

    # Without a seed the global generator decides.
    torch.manual_seed(5)
    first = ref.attention(q, k, v, dropout_p=p)
    torch.manual_seed(5)
    assert torch.equal(first, ref.attention(q, k, v, dropout_p=p))


# --------------------------------------------------------------------------- varlen

VARLEN_OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "causal-window1": dict(causal=True, window=(1, -1)),
    "window1,2-softcap": dict(window=(1, 2), softcap=3.0),
}


@pytest.mark.parametrize("opt", list(VARLEN_OPTIONS), ids=list(VARLEN_OPTIONS))
def test_attention_varlen_matches_per_sequence(opt):
    options = VARLEN_OPTIONS[opt]
    lens_q, lens_k = [3, 0, 5, 1, 4], [5, 1, 0, 7, 2]   # includes empty q, empty k, Sq > Sk
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q_heads, kv_heads, dim, dim_v = 4, 2, 4, 3
    q = _leaf(_randn(sum(lens_q), q_heads, dim, seed=1))
    k = _leaf(_randn(sum(lens_k), kv_heads, dim, seed=2))
    v = _leaf(_randn(sum(lens_k), kv_heads, dim_v, seed=3))
    # Non-contiguous packed views: every second row of a wider buffer.
    qv, kv, vv = (torch.stack([x, x], 1)[:, 0] for x in (q, k, v))
    out, lse = ref.attention_varlen(qv, kv, vv, cu_q, cu_k, max(lens_q), max(lens_k),
                                    return_lse=True, **options)
    assert out.shape == (sum(lens_q), q_heads, dim_v) and lse.shape == (q_heads, sum(lens_q))

    outs, lses = [], []
    for b in range(len(lens_q)):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        o, l = naive_attention(q[sq].transpose(0, 1)[None], k[sk].transpose(0, 1)[None],
                               v[sk].transpose(0, 1)[None], **options)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    want_out, want_lse = torch.cat(outs), torch.cat(lses, 1)
    torch.testing.assert_close(out, want_out, **CLOSE)
    torch.testing.assert_close(lse, want_lse, **CLOSE)
    _assert_all_close(_grads([out, lse], [q, k, v], seed=4), _grads([want_out, want_lse], [q, k, v], seed=4))


def test_attention_varlen_dropout_uses_packed_row_counters():
    lens, heads, dim, p, seed = [3, 0, 4], 2, 4, 0.4, 17
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    q, k, v = (_randn(sum(lens), heads, dim, seed=s) for s in (1, 2, 3))
    out = ref.attention_varlen(q, k, v, cu, cu, 4, 4, causal=True, dropout_p=p, dropout_seed=seed)
    total = sum(lens)
    outs = []
    for b, n in enumerate(lens):
        rows = slice(cu[b], cu[b + 1])
        # entry (h, i, j) of sequence b draws counter (h * total_q + cu[b] + i) * total_k + cu[b] + j
        h, i, j = torch.meshgrid(torch.arange(heads), torch.arange(n), torch.arange(n), indexing="ij")
        offsets = (h * total + cu[b] + i) * total + cu[b] + j
        keep = ((ref.philox_uint32(seed, offsets.long()) >> 8) >= math.ceil(p * 2 ** 24))[None]
        o, _ = naive_attention(*(x[rows].transpose(0, 1)[None] for x in (q, k, v)),
                               causal=True, keep=keep, dropout_p=p)
        outs.append(o[0].transpose(0, 1))
    torch.testing.assert_close(out, torch.cat(outs), **CLOSE)


# --------------------------------------------------------------------------- merge

@pytest.mark.parametrize("split", ["first0", "first3", "all", "random"])
def test_merge_attention_equals_attention_over_the_union(split):
    leaves, (q, k, v) = _qkv((2, 4, 2, 5, 9, 4, 3), seed=8)
    if split == "random":
        part_a = torch.rand(2, 4, 5, 9, generator=_gen(1)) < 0.5
    else:
        cut = {"first0": 0, "first3": 3, "all": 9}[split]
        part_a = (torch.arange(9) < cut).expand(2, 4, 5, 9)
    out_a, lse_a = ref.attention(q, k, v, causal=True, attn_bias=part_a, return_lse=True)
    out_b, lse_b = ref.attention(q, k, v, causal=True, attn_bias=~part_a, return_lse=True)
    out, lse = ref.merge_attention(out_a, lse_a, out_b, lse_b)
    want_out, want_lse = ref.attention(q, k, v, causal=True, return_lse=True)
    torch.testing.assert_close(out, want_out, **CLOSE)
    torch.testing.assert_close(lse, want_lse, **CLOSE)
    _assert_all_close(_grads([out, lse], leaves, seed=2), _grads([want_out, want_lse], leaves, seed=2))


def test_merge_attention_both_sides_empty():
    out_a = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    lse_a = torch.tensor([NEG_INF, 0.5], dtype=F64, requires_grad=True)
    out_b = torch.ones(2, 3, dtype=F64, requires_grad=True)
    lse_b = torch.tensor([NEG_INF, NEG_INF], dtype=F64, requires_grad=True)
    out, lse = ref.merge_attention(out_a, lse_a, out_b, lse_b)
    assert torch.equal(out[0], torch.zeros(3, dtype=F64)) and torch.isneginf(lse[0])
    torch.testing.assert_close(out[1], out_a[1])
    torch.testing.assert_close(lse[1], lse_a[1])
    grads = torch.autograd.grad(out.sum() + lse.sum(), [out_a, lse_a, out_b, lse_b])
    assert all(torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------- linear attention

def _tanh_map(x):
    return torch.tanh(x) + 1.0


def _feature_map(name, dim, seed):
    torch.manual_seed(seed)
    if name == "favor":
        return fm.Favor(dim, 6).double()
    if name == "t2r":
        return fm.T2R(dim, 5).double()
    if name == "callable":
        return _tanh_map
    return name


def naive_linear(q, k, v, *, causal, feature_map, normalize, log_decay, scale, eps, initial_state):
    """Explicit sums over earlier tokens with explicit products of decay factors.

    `log_decay` here is always (B, Hq, S) or None."""
    f = fm.resolve(feature_map)
    batch, q_heads, seq, _ = q.shape
    group = q_heads // k.shape[1]
    qf, kf = f(q) * scale, f(k)
    rows = []
    for b in range(batch):
        for h in range(q_heads):
            g = h // group
            s0 = None if initial_state is None else initial_state[0][b, h]
            z0 = None if initial_state is None else initial_state[1][b, h]
            if causal:
                factor = [1.0 if log_decay is None else torch.exp(log_decay[b, h, t]) for t in range(seq)]
            for t in range(seq):
                num = torch.zeros(v.shape[-1], dtype=q.dtype)
                den = torch.zeros((), dtype=q.dtype)
                sources = range(t + 1) if causal else range(seq)
                for s in sources:
                    weight = math.prod(factor[s + 1:t + 1]) if causal else 1.0
                    dot = weight * (qf[b, h, t] @ kf[b, g, s])
                    num = num + dot * v[b, g, s]
                    den = den + dot
                if s0 is not None:
                    weight = math.prod(factor[:t + 1]) if causal else 1.0
                    num = num + weight * (qf[b, h, t] @ s0)
                    den = den + weight * (qf[b, h, t] @ z0)
                rows.append(num / (den + eps) if normalize else num)
    if not rows:
        return v.new_zeros(batch, q_heads, seq, v.shape[-1])
    return torch.stack(rows).reshape(batch, q_heads, seq, v.shape[-1])


LINEAR_SHAPES = {  # B, Hq, Hkv, S, D, Dv
    "B1-H1/1-S1-D3": (1, 1, 1, 1, 3, 3),
    "B2-H4/2-S7-D4-Dv5": (2, 4, 2, 7, 4, 5),
    "B1-H2/1-S0-D3-Dv2": (1, 2, 1, 0, 3, 2),
    "B2-H2/2-S6-D3": (2, 2, 2, 6, 3, 3),
}

LINEAR_OPTIONS = {  # causal, feature_map, normalize, decay kind, initial state, scale
    "causal-elu": (True, "elu", True, None, False, 1.0),
    "causal-identity-raw": (True, "identity", False, None, False, 0.5),
    "causal-relu-state": (True, "relu", True, None, True, 1.0),
    "causal-elu-decayfloat": (True, "elu", True, "float", False, 1.0),
    "causal-elu-decayhead-state": (True, "elu", True, "head", True, 0.7),
    "causal-identity-decaytoken-raw-state": (True, "identity", False, "token", True, 1.0),
    "causal-callable-decaytoken": (True, "callable", True, "token", False, 1.0),
    "causal-favor-state": (True, "favor", True, None, True, 1.0),
    "causal-t2r-decaytoken-state": (True, "t2r", True, "token", True, 1.0),
    "noncausal-elu": (False, "elu", True, None, False, 1.0),
    "noncausal-identity-raw-state": (False, "identity", False, None, True, 1.0),
    "noncausal-favor-state": (False, "favor", True, None, True, 0.5),
}


def _linear_case(shape, option, seed=0):
    batch, q_heads, kv_heads, seq, dim, dim_v = shape
    causal, fmap_name, normalize, decay, with_state, scale = LINEAR_OPTIONS[option]
    fmap = _feature_map(fmap_name, dim, seed)
    q = _leaf(_randn(batch, q_heads, seq, dim, seed=seed))
    k = _leaf(_randn(batch, kv_heads, seq, dim, seed=seed + 1))
    v = _leaf(_randn(batch, kv_heads, seq, dim_v, seed=seed + 2))
    log_decay = {None: None, "float": -0.3,
                 "head": _leaf(-torch.rand(q_heads, generator=_gen(seed + 3), dtype=F64)),
                 "token": _leaf(-torch.rand(batch, q_heads, seq, generator=_gen(seed + 3), dtype=F64))}[decay]
    state = None
    if with_state:
        num_features = fmap(q[..., :1, :]).shape[-1] if callable(fmap) else dim
        state = (_leaf(_randn(batch, q_heads, num_features, dim_v, seed=seed + 4)),
                 _leaf(torch.rand(batch, q_heads, num_features, generator=_gen(seed + 5), dtype=F64) + 1))
    kwargs = dict(causal=causal, feature_map=fmap, normalize=normalize, log_decay=log_decay,
                  scale=scale, eps=1e-6, initial_state=state)
    tensors = [q, k, v] + ([log_decay] if torch.is_tensor(log_decay) else []) + (list(state) if state else [])
    return (q, k, v), kwargs, tensors


def _per_token(log_decay, shape):
    batch, q_heads, _, seq, _, _ = shape
    if log_decay is None:
        return None
    if not torch.is_tensor(log_decay):
        return torch.full((batch, q_heads, seq), log_decay, dtype=F64)
    return log_decay[None, :, None].expand(batch, q_heads, seq) if log_decay.dim() == 1 else log_decay


@pytest.mark.parametrize("option", list(LINEAR_OPTIONS), ids=list(LINEAR_OPTIONS))
@pytest.mark.parametrize("shape", list(LINEAR_SHAPES.values()), ids=list(LINEAR_SHAPES))
def test_linear_attention_closed_form_vs_recurrent_vs_naive(shape, option):
    (q, k, v), kwargs, tensors = _linear_case(shape, option)
    qs, ks, vs = (_strided(x) for x in (q, k, v))
    out, (state, norm) = ref.linear_attention(qs, ks, vs, output_final_state=True, **kwargs)
    out_r, (state_r, norm_r) = ref.linear_attention_recurrent(q, k, v, output_final_state=True, **kwargs)

    batch, q_heads, _, seq, dim, dim_v = shape
    assert out.shape == (batch, q_heads, seq, dim_v) and out.dtype == F64
    assert state.shape[:2] == (batch, q_heads) and state.shape[-1] == dim_v and norm.shape == state.shape[:3]
    _assert_all_close([out, state, norm], [out_r, state_r, norm_r])
    if seq == 0:
        expected = kwargs["initial_state"] or (torch.zeros_like(state), torch.zeros_like(norm))
        _assert_all_close([state, norm], list(expected))

    naive_kwargs = dict(kwargs, log_decay=_per_token(kwargs["log_decay"], shape))
    torch.testing.assert_close(out, naive_linear(q, k, v, **naive_kwargs), **CLOSE)

    got = _grads([out, state, norm], tensors, seed=9)
    want = _grads([out_r, state_r, norm_r], tensors, seed=9)
    _assert_all_close(got, want)


@pytest.mark.parametrize("decay", ["none", "token"])
def test_linear_attention_chunks_and_single_tokens_with_state_passing(decay):
    shape = (2, 4, 2, 7, 4, 3)
    batch, q_heads, kv_heads, seq, dim, dim_v = shape
    q, k, v = (_randn(batch, h, seq, d, seed=s) for h, d, s in ((q_heads, dim, 1), (kv_heads, dim, 2),
                                                               (kv_heads, dim_v, 3)))
    log_decay = None if decay == "none" else -torch.rand(batch, q_heads, seq, generator=_gen(4), dtype=F64)
    state0 = (_randn(batch, q_heads, dim, dim_v, seed=5), torch.rand(batch, q_heads, dim, dtype=F64) + 1)

    def run(lo, hi, state):
        piece = None if log_decay is None else log_decay[..., lo:hi]
        return ref.linear_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], log_decay=piece,
                                    initial_state=state, output_final_state=True)

    whole, whole_state = run(0, seq, state0)
    first, mid_state = run(0, 3, state0)
    second, end_state = run(3, seq, mid_state)
    torch.testing.assert_close(torch.cat([first, second], 2), whole, **CLOSE)
    _assert_all_close(list(end_state), list(whole_state))

    state, outs = state0, []
    for t in range(seq):
        out_t, state = run(t, t + 1, state)
        outs.append(out_t)
    torch.testing.assert_close(torch.cat(outs, 2), whole, **CLOSE)
    _assert_all_close(list(state), list(whole_state))


def test_linear_attention_noncausal_state_accumulates_over_chunks():
    q, k, v = (_randn(1, 2, 6, 3, seed=s) for s in (1, 2, 3))
    _, full = ref.linear_attention(q, k, v, causal=False, output_final_state=True)
    _, half = ref.linear_attention(q[:, :, :2], k[:, :, :2], v[:, :, :2], causal=False, output_final_state=True)
    _, rest = ref.linear_attention(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], causal=False,
                                   initial_state=half, output_final_state=True)
    _assert_all_close(list(rest), list(full))


def test_linear_attention_identity_is_masked_matmul():
    q, k, v = (_randn(2, 3, 5, 4, seed=s) for s in (1, 2, 3))
    out = ref.linear_attention(q, k, v, feature_map="identity", normalize=False, scale=0.5)
    torch.testing.assert_close(out, torch.tril(0.5 * q @ k.transpose(-1, -2)) @ v, **CLOSE)
    out = ref.linear_attention(q, k, v, causal=False, feature_map="identity", normalize=False)
    torch.testing.assert_close(out, q @ (k.transpose(-1, -2) @ v), **CLOSE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_attention_low_precision(dtype):
    q, k, v = (_randn(1, 2, 5, 4, seed=s).to(dtype) for s in (1, 2, 3))
    log_decay = torch.full((1, 2, 5), -0.1, dtype=dtype)
    out, (state, norm) = ref.linear_attention(q, k, v, log_decay=log_decay, output_final_state=True)
    assert out.dtype == dtype and state.dtype == torch.float32 and norm.dtype == torch.float32
    want = ref.linear_attention(q.to(F64), k.to(F64), v.to(F64), log_decay=log_decay.to(F64))
    torch.testing.assert_close(out.to(F64), want, atol=2e-2, rtol=2e-2)


def test_linear_attention_float32_modules_on_float64_inputs():
    q, k, v = (_randn(1, 2, 4, 3, seed=s) for s in (1, 2, 3))
    for fmap in (fm.T2R(3, 5), fm.Favor(3, 4), fm.ELU1(), fm.ReLU()):
        out = ref.linear_attention(q, k, v, feature_map=fmap)
        assert out.dtype == F64 and torch.isfinite(out).all()


# --------------------------------------------------------------------------- feature maps

def test_resolve_feature_maps():
    x = _randn(3, 4, seed=1)
    torch.testing.assert_close(fm.resolve("identity")(x), x)
    torch.testing.assert_close(fm.resolve("elu")(x), torch.where(x > 0, x + 1, torch.exp(x)))
    torch.testing.assert_close(fm.resolve("relu")(x), x.clamp(min=0))
    torch.testing.assert_close(fm.ELU1()(x), fm.resolve("elu")(x))
    torch.testing.assert_close(fm.ReLU()(x), fm.resolve("relu")(x))
    assert fm.resolve(_tanh_map) is _tanh_map
    with pytest.raises(ValueError, match="feature_map"):
        fm.resolve("softmax")
    with pytest.raises(TypeError, match="feature_map"):
        fm.resolve(3)


def test_favor_features_are_positive_orthogonal_and_redrawn():
    torch.manual_seed(0)
    favor = fm.Favor(8, 20)
    assert favor.redraw and favor.projection.shape == (20, 8) and "projection" in dict(favor.named_buffers())
    directions = F.normalize(favor.projection[:8].double(), dim=-1)
    torch.testing.assert_close(directions @ directions.T, torch.eye(8, dtype=F64), atol=1e-5, rtol=0)
    x = _randn(2, 3, 5, 8, seed=1).float()
    features = favor(x)
    assert features.shape == (2, 3, 5, 20) and (features > 0).all()
    assert torch.isfinite(favor(100 * x)).all()       # the clamp keeps huge inputs finite
    before = favor.projection.clone()
    favor.redraw_()
    assert not torch.equal(before, favor.projection)
    assert not fm.Favor(8, 4, redraw=False).redraw


def test_favor_estimate_improves_with_more_features():
    dim = 8
    q = 0.5 * _randn(64, dim, seed=1)
    k = 0.5 * _randn(64, dim, seed=2)
    exact = torch.exp((q * k).sum(-1) / math.sqrt(dim))

    def mean_error(num_features):
        torch.manual_seed(3)
        errors = []
        for _ in range(8):
            favor = fm.Favor(dim, num_features).double()
            estimate = (favor(q) * favor(k)).sum(-1)
            errors.append(((estimate - exact) / exact).pow(2).mean())
        return torch.stack(errors).mean().item()

    # The relative variance falls like 1 / num_features; a biased draw would plateau.
    few, some, many = mean_error(4), mean_error(64), mean_error(2048)
    assert many < some / 10 < few / 40 and many < 3e-3


def test_t2r_is_relu_of_affine():
    torch.manual_seed(0)
    t2r = fm.T2R(4, 6)
    assert t2r.weight.shape == (6, 4) and t2r.bias.shape == (6,)
    x = _randn(3, 2, 4, seed=1).float()
    torch.testing.assert_close(t2r(x), torch.relu(x @ t2r.weight.T + t2r.bias))


# --------------------------------------------------------------------------- block-sparse / top-k

def _mask_from_indices(block_indices, q_heads, seq_q, seq_k, block_size):
    """Bool (B, Hq, Sq, Sk) built entry by entry from the block list."""
    batch, kv_heads, num_qblocks, num_sel = block_indices.shape
    group = q_heads // kv_heads
    mask = torch.zeros(batch, q_heads, seq_q, seq_k, dtype=torch.bool)
    for b in range(batch):
        for g in range(kv_heads):
            for i in range(num_qblocks):
                for n in range(num_sel):
                    j = int(block_indices[b, g, i, n])
                    if j >= 0:
                        mask[b, g * group:(g + 1) * group, i * block_size:(i + 1) * block_size,
                             j * block_size:(j + 1) * block_size] = True
    return mask


BLOCK_SHAPES = {  # B, Hq, Hkv, Sq, Sk, D, Dv, block_size
    "B1-H2/1-S9x13-D4-Dv3-bs4": (1, 2, 1, 9, 13, 4, 3, 4),
    "B2-H4/2-S16x16-D8-bs4": (2, 4, 2, 16, 16, 8, 8, 4),
    "B1-H2/2-S5x11-D4-bs3": (1, 2, 2, 5, 11, 4, 4, 3),
    "B1-H1/1-S1x7-D4-bs4": (1, 1, 1, 1, 7, 4, 4, 4),
    "B1-H2/1-S11x5-D4-bs4": (1, 2, 1, 11, 5, 4, 4, 4),
    "B1-H2/1-S0x5-D4-bs4": (1, 2, 1, 0, 5, 4, 4, 4),
    "B1-H2/1-S6x0-D4-bs4": (1, 2, 1, 6, 0, 4, 4, 4),
}


def _random_block_indices(batch, kv_heads, num_qblocks, num_kblocks, num_sel, seed):
    """Random entries in [-1, nkb): padding anywhere, duplicates, any order."""
    return torch.randint(-1, max(num_kblocks, 0), (batch, kv_heads, num_qblocks, num_sel),
                         generator=_gen(seed)).to(torch.int32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", list(BLOCK_SHAPES.values()), ids=list(BLOCK_SHAPES))
def test_block_sparse_attention_matches_masked_attention(shape, causal):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, dim_v, bs = shape
    leaves, (q, k, v) = _qkv(shape[:7], seed=4)
    num_qblocks, num_kblocks = -(-seq_q // bs), -(-seq_k // bs)
    indices = _random_block_indices(batch, kv_heads, num_qblocks, num_kblocks, 3, seed=5)
    out, lse = ref.block_sparse_attention(q, k, v, indices, block_size=bs, causal=causal, return_lse=True)
    mask = _mask_from_indices(indices, q_heads, seq_q, seq_k, bs)
    want_out, want_lse = naive_attention(q, k, v, causal=causal, attn_bias=mask)
    torch.testing.assert_close(out, want_out, **CLOSE)
    torch.testing.assert_close(lse, want_lse, **CLOSE)
    _assert_all_close(_grads([out, lse], leaves, seed=6), _grads([want_out, want_lse], leaves, seed=6))


@pytest.mark.parametrize("shape", list(BLOCK_SHAPES.values()), ids=list(BLOCK_SHAPES))
def test_quest_bounds_bound_every_logit(shape):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, _, bs = shape
    q = _randn(batch, q_heads, seq_q, dim, seed=1)
    k = _randn(batch, kv_heads, seq_k, dim, seed=2)
    bounds = ref.block_upper_bounds(q, k, block_size=bs, scale=0.7)
    group = q_heads // kv_heads
    assert bounds.shape == (batch, kv_heads, -(-seq_q // bs), -(-seq_k // bs)) and not bounds.requires_grad
    for b in range(batch):
        for h in range(q_heads):
            logits = 0.7 * q[b, h] @ k[b, h // group].T                         # (Sq, Sk)
            for t in range(seq_q):
                for s in range(seq_k):
                    assert logits[t, s] <= bounds[b, h // group, t // bs, s // bs] + 1e-12


def test_quest_bounds_are_exact_for_single_token_blocks():
    q, k = _randn(1, 1, 5, 4, seed=1), _randn(1, 1, 6, 4, seed=2)
    bounds = ref.block_upper_bounds(q, k, block_size=1)
    torch.testing.assert_close(bounds[0, 0], q[0, 0] @ k[0, 0].T / 2, **CLOSE)
    assert ref.block_upper_bounds(q.float(), k.float(), block_size=2).dtype == torch.float32


def naive_topk_indices(q, k, *, top_k, block_size, causal, num_sink_blocks, num_local_blocks):
    """Selection written per (batch, kv head, query block) with Python sets and sorting."""
    bounds = ref.block_upper_bounds(q, k, block_size=block_size)
    batch, kv_heads, num_qblocks, num_kblocks = bounds.shape
    seq_q, seq_k = q.shape[2], k.shape[2]
    num_sel = min(num_sink_blocks + num_local_blocks + top_k, num_kblocks)
    result = torch.full((batch, kv_heads, num_qblocks, num_sel), -1, dtype=torch.int32)
    for i in range(num_qblocks):
        last_key = min((i + 1) * block_size, seq_q) - 1 + seq_k - seq_q   # last key its last query sees
        diagonal = min(num_kblocks - 1, math.floor(last_key / block_size))
        sinks = {j for j in range(num_sink_blocks) if j < num_kblocks}
        local = {diagonal - n for n in range(num_local_blocks) if diagonal - n >= 0}
        for b in range(batch):
            for g in range(kv_heads):
                others = [j for j in range(num_kblocks) if j not in sinks | local
                          and (not causal or j * block_size <= last_key)]
                others.sort(key=lambda j: (-float(bounds[b, g, i, j]), j))
                kept = sorted(sinks | local | set(others[:top_k]))
                result[b, g, i, :len(kept)] = torch.tensor(kept, dtype=torch.int32)
    return result


TOPK_CASES = {  # shape (B, Hq, Hkv, Sq, Sk, D, Dv, bs), top_k, sinks, locals
    "S16x16-bs4-top1": ((2, 4, 2, 16, 16, 4, 4, 4), 1, 1, 1),
    "S9x23-bs4-top2-sink2-local2": ((1, 2, 1, 9, 23, 4, 3, 4), 2, 2, 2),
    "S13x5-bs3-top1-nosink": ((1, 2, 2, 13, 5, 4, 4, 3), 1, 0, 1),
    "S1x30-bs4-top3-decode": ((1, 2, 1, 1, 30, 4, 4, 4), 3, 1, 2),
    "S7x7-bs2-top0-nolocal": ((1, 1, 1, 7, 7, 4, 4, 2), 0, 1, 0),
    "S5x0-bs4": ((1, 2, 1, 5, 0, 4, 4, 4), 2, 1, 1),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", list(TOPK_CASES.values()), ids=list(TOPK_CASES))
def test_topk_block_indices_matches_naive_selection(case, causal):
    shape, top_k, sinks, local = case
    batch, q_heads, kv_heads, seq_q, seq_k, dim, _, bs = shape
    q = _randn(batch, q_heads, seq_q, dim, seed=1)
    k = _randn(batch, kv_heads, seq_k, dim, seed=2)
    got = ref.topk_block_indices(q, k, top_k=top_k, block_size=bs, causal=causal,
                                 num_sink_blocks=sinks, num_local_blocks=local)
    assert got.dtype == torch.int32 and got.shape == (batch, kv_heads, -(-seq_q // bs), min(sinks + local + top_k, -(-seq_k // bs)))
    want = naive_topk_indices(q, k, top_k=top_k, block_size=bs, causal=causal,
                              num_sink_blocks=sinks, num_local_blocks=local)
    assert torch.equal(got, want)
    # Valid entries first, ascending, no duplicates.
    for row in got.reshape(-1, got.shape[-1]).tolist() if got.numel() else []:
        valid = [j for j in row if j >= 0]
        assert row == valid + [-1] * (len(row) - len(valid)) and valid == sorted(set(valid))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", list(TOPK_CASES.values()), ids=list(TOPK_CASES))
def test_topk_attention_with_every_block_equals_attention(case, causal):
    shape, _, sinks, local = case
    leaves, (q, k, v) = _qkv(shape[:7], seed=3)
    bs = shape[7]
    every = -(-shape[4] // bs)
    out, indices = ref.topk_attention(q, k, v, top_k=every, block_size=bs, causal=causal,
                                      num_sink_blocks=sinks, num_local_blocks=local, return_block_indices=True)
    want = ref.attention(q, k, v, causal=causal)
    torch.testing.assert_close(out, want, **CLOSE)
    _assert_all_close(_grads([out], leaves, seed=4), _grads([want], leaves, seed=4))
    assert indices.shape[-1] == min(sinks + local + every, every)


def test_topk_attention_is_block_sparse_on_its_selection():
    shape = (1, 4, 2, 16, 24, 4, 4, 4)
    _, (q, k, v) = _qkv(shape[:7], seed=6)
    out, indices = ref.topk_attention(q, k, v, top_k=1, block_size=4, return_block_indices=True)
    mask = _mask_from_indices(indices, 4, 16, 24, 4)
    torch.testing.assert_close(out, ref.attention(q, k, v, causal=True, attn_bias=mask), **CLOSE)
    assert (indices >= 0).sum(-1).max() <= 3


# --------------------------------------------------------------------------- cross attention

CROSS_CASES = {
    "none": (None, None),
    "lengths": ([5, 0, 9], None),
    "padding": (None, "random"),
    "lengths-and-padding": ([7, 2, 9], "random"),
}


@pytest.mark.parametrize("case", list(CROSS_CASES), ids=list(CROSS_CASES))
def test_cross_attention_matches_masked_attention(case):
    lengths, padding = CROSS_CASES[case]
    batch, q_heads, kv_heads, seq_q, seq_k, dim, dim_v = 3, 4, 2, 3, 9, 4, 5
    latents = _leaf(_randn(1, q_heads, seq_q, dim, seed=1))
    q = latents.expand(batch, -1, -1, -1)                                   # batch stride 0
    k = _leaf(_randn(batch, kv_heads, seq_k, dim, seed=2))
    v = _leaf(_randn(batch, kv_heads, seq_k, dim_v, seed=3))
    kv_lengths = None if lengths is None else torch.tensor(lengths, dtype=torch.int32)
    key_padding_mask = None if padding is None else torch.rand(batch, seq_k, generator=_gen(4)) < 0.3
    out, lse = ref.cross_attention(q, k, v, kv_lengths=kv_lengths, key_padding_mask=key_padding_mask,
                                   return_lse=True)

    keep = torch.ones(batch, 1, seq_q, seq_k, dtype=torch.bool)
    for b in range(batch):
        for s in range(seq_k):
            if lengths is not None and s >= lengths[b]:
                keep[b, :, :, s] = False
            if key_padding_mask is not None and key_padding_mask[b, s]:
                keep[b, :, :, s] = False
    q_full = _leaf(q)
    want_out, want_lse = naive_attention(q_full, k, v, attn_bias=keep)
    torch.testing.assert_close(out, want_out, **CLOSE)
    torch.testing.assert_close(lse, want_lse, **CLOSE)
    got = _grads([out, lse], [latents, k, v], seed=5)
    want = _grads([want_out, want_lse], [q_full, k, v], seed=5)
    want[0] = want[0].sum(0, keepdim=True)                                  # broadcast q: grads sum
    _assert_all_close(got, want)
    if lengths is not None and 0 in lengths:
        empty = lengths.index(0)
        assert torch.equal(out[empty], torch.zeros_like(out[empty])) and torch.isneginf(lse[empty]).all()


# --------------------------------------------------------------------------- gradcheck (float64)

def _finite(x):
    """-inf lse entries (rows that see nothing) are constant; gradcheck cannot difference them."""
    return torch.where(torch.isfinite(x), x, 0.0)


def _small(*shape, seed):
    return _randn(*shape, seed=seed).requires_grad_(True)


def test_gradcheck_attention():
    q, k, v = _small(1, 2, 3, 3, seed=1), _small(1, 1, 4, 3, seed=2), _small(1, 1, 4, 2, seed=3)
    bias = _small(1, 2, 3, 4, seed=4)

    def fn(q, k, v, bias):
        out, lse = ref.attention(q, k, v, causal=True, softcap=2.0, window=(2, -1), attn_bias=bias,
                                 return_lse=True)
        return out, lse
    assert torch.autograd.gradcheck(fn, (q, k, v, bias))

    # Sq > Sk causal: two rows see no key.
    q = _small(2, 2, 4, 3, seed=5)
    k, v = _small(2, 1, 2, 3, seed=6), _small(2, 1, 2, 2, seed=7)

    def masked(q, k, v):
        out, lse = ref.attention(q, k, v, causal=True, return_lse=True)
        return out, _finite(lse)
    assert torch.autograd.gradcheck(masked, (q, k, v))


def test_gradcheck_attention_dropout():
    q, k, v = _small(1, 2, 3, 3, seed=1), _small(1, 2, 5, 3, seed=2), _small(1, 2, 5, 2, seed=3)
    assert torch.autograd.gradcheck(
        lambda q, k, v: ref.attention(q, k, v, dropout_p=0.3, dropout_seed=4, return_lse=True), (q, k, v))


def test_gradcheck_attention_varlen():
    cu_q = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    q, k, v = _small(5, 2, 3, seed=1), _small(6, 1, 3, seed=2), _small(6, 1, 2, seed=3)

    def fn(q, k, v):
        out, lse = ref.attention_varlen(q, k, v, cu_q, cu_k, 3, 3, causal=True, return_lse=True)
        return out, _finite(lse)
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("impl", [ref.linear_attention, ref.linear_attention_recurrent],
                         ids=["closed-form", "recurrent"])
def test_gradcheck_linear_attention(impl):
    q, k, v = _small(1, 2, 5, 3, seed=1), _small(1, 1, 5, 3, seed=2), _small(1, 1, 5, 2, seed=3)
    log_decay = (-torch.rand(1, 2, 5, dtype=F64, generator=_gen(4))).requires_grad_(True)
    state = _small(1, 2, 3, 2, seed=5)
    norm = (torch.rand(1, 2, 3, dtype=F64, generator=_gen(6)) + 1).requires_grad_(True)

    def fn(q, k, v, log_decay, state, norm):
        out, (s, z) = impl(q, k, v, log_decay=log_decay, initial_state=(state, norm), output_final_state=True)
        return out, s, z
    assert torch.autograd.gradcheck(fn, (q, k, v, log_decay, state, norm))

    head_decay = (-torch.rand(2, dtype=F64, generator=_gen(7))).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, d: impl(q, k, v, feature_map="relu", log_decay=d, normalize=False), (q, k, v, head_decay))
    assert torch.autograd.gradcheck(
        lambda q, k, v, s, z: impl(q, k, v, causal=False, initial_state=(s, z), output_final_state=True)[0],
        (q, k, v, state, norm))


def test_gradcheck_feature_map_modules():
    torch.manual_seed(0)
    q, k, v = _small(1, 2, 4, 3, seed=1), _small(1, 2, 4, 3, seed=2), _small(1, 2, 4, 2, seed=3)
    t2r = fm.T2R(3, 4).double()
    weight = t2r.weight.detach().clone().requires_grad_(True)
    bias = (t2r.bias.detach() + 0.5).requires_grad_(True)   # keep relu features away from all-zero rows

    def with_t2r(q, k, v, weight, bias):
        def feature_map(x):
            return torch.func.functional_call(t2r, {"weight": weight, "bias": bias}, (x,))
        return ref.linear_attention(q, k, v, feature_map=feature_map)
    assert torch.autograd.gradcheck(with_t2r, (q, k, v, weight, bias))

    favor = fm.Favor(3, 5).double()
    assert torch.autograd.gradcheck(lambda q, k, v: ref.linear_attention(q, k, v, feature_map=favor), (q, k, v))


def test_gradcheck_block_sparse_and_topk():
    q, k, v = _small(1, 2, 6, 3, seed=1), _small(1, 1, 7, 3, seed=2), _small(1, 1, 7, 2, seed=3)
    indices = torch.tensor([[[[0, -1, 2], [3, 1, 1], [-1, -1, -1]]]], dtype=torch.int32)  # 3 query blocks of 2

    def sparse(q, k, v):
        out, lse = ref.block_sparse_attention(q, k, v, indices, block_size=2, return_lse=True)
        return out, _finite(lse)
    assert torch.autograd.gradcheck(sparse, (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: ref.topk_attention(q, k, v, top_k=1, block_size=2, num_local_blocks=1), (q, k, v))


def test_gradcheck_cross_attention():
    latents = _small(1, 2, 2, 3, seed=1)
    k, v = _small(3, 1, 5, 3, seed=2), _small(3, 1, 5, 2, seed=3)
    lengths = torch.tensor([5, 0, 3])
    padding = torch.tensor([[False, True, False, False, False]] * 3)

    def fn(latents, k, v):
        out, lse = ref.cross_attention(latents.expand(3, -1, -1, -1), k, v, kv_lengths=lengths,
                                       key_padding_mask=padding, return_lse=True)
        return out, _finite(lse)
    assert torch.autograd.gradcheck(fn, (latents, k, v))


def test_gradcheck_merge_attention():
    out_a, out_b = _small(2, 3, 2, seed=1), _small(2, 3, 2, seed=2)
    lse_a = _small(2, 3, seed=3)
    lse_b = _randn(2, 3, seed=4)
    lse_b[0, 1] = NEG_INF                      # one side empty
    lse_b.requires_grad_(True)
    assert torch.autograd.gradcheck(ref.merge_attention, (out_a, lse_a, out_b, lse_b))
