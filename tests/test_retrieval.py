"""`RetrievalKVCache` against full attention and an independent brute-force top-k.

The brute force here picks the top_k middle keys per (query head, query) by
q.k, builds a boolean mask sinks | window | selected over all stored keys and
runs `pyattn.reference.attention` with it. The exact index must equal it; the
IVF index must find most of the same keys while reading a small fraction.
"""
from __future__ import annotations

import pytest
import torch

from pyattn import RetrievalKVCache
from pyattn import reference as ref
from pyattn.testing import assert_close

F64 = torch.float64
CLOSE64 = dict(atol=1e-10, rtol=1e-9)


def _randn(*shape, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _full(q, k, v, scale=None):
    """Full softmax attention of q (Hq, n_q, D) over k, v (H, N, D[v]) (GQA by the reference)."""
    return ref.attention(q[None], k[None], v[None], scale=scale)[0]


def _brute_force(q, k, v, *, sinks, window, top_k, scale=None):
    hq, n = q.shape[0], k.shape[1]
    group = hq // k.shape[0]
    s = min(sinks, n)
    w0 = max(s, n - window)
    keep = torch.zeros(hq, q.shape[1], n, dtype=torch.bool)
    keep[..., :s] = True
    keep[..., w0:] = True
    if w0 > s:
        logits = q @ k.repeat_interleave(group, 0)[:, s:w0].transpose(1, 2)      # (Hq, n_q, middle)
        keep.scatter_(2, logits.topk(min(top_k, w0 - s), dim=-1).indices + s, True)
    return ref.attention(q[None], k[None], v[None], scale=scale, attn_bias=keep[None])[0]


def _clustered(heads, n, dim, n_clusters, seed):
    """Keys around `n_clusters` random centers per head, and queries near those centers."""
    gen = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(heads, n_clusters, dim, generator=gen)
    label = torch.randint(0, n_clusters, (heads, n), generator=gen)
    keys = centers.gather(1, label[..., None].expand(heads, n, dim)) + 0.5 * torch.randn(heads, n, dim, generator=gen)
    values = torch.randn(heads, n, dim, generator=gen)
    return centers, keys, values


def _filled(keys, values, **kwargs):
    cache = RetrievalKVCache(keys.shape[0], keys.shape[2], head_dim_v=values.shape[2], dtype=keys.dtype, **kwargs)
    cache.append(keys, values)
    return cache


# --------------------------------------------------------------------------- full attention

@pytest.mark.parametrize("index", ["exact", "ivf"])
@pytest.mark.parametrize("heads,heads_q,dim,dim_v,n", [
    (2, 2, 16, 16, 300),
    (2, 6, 16, 24, 300),       # GQA, head_dim_v != head_dim
    (1, 4, 8, 8, 1500),        # MQA; past the IVF training size
    (3, 3, 16, 8, 7),          # shorter than the window
], ids=lambda x: str(x))
def test_top_k_covering_middle_is_full_attention(index, heads, heads_q, dim, dim_v, n):
    k, v = _randn(heads, n, dim, seed=1), _randn(heads, n, dim_v, seed=2)
    q = _randn(heads_q, 5, dim, seed=3)
    cache = _filled(k, v, num_sink_tokens=3, window=50, top_k=n, index=index)
    torch.testing.assert_close(cache.attend(q), _full(q, k, v), **CLOSE64)
    assert len(cache) == n


# --------------------------------------------------------------------------- exact top-k

@pytest.mark.parametrize("heads,heads_q,sinks,window,top_k,scale", [
    (2, 4, 4, 100, 32, None),
    (2, 2, 0, 1, 1, None),
    (1, 3, 7, 64, 200, 0.3),
], ids=["H2/4-S4-W100-K32", "H2/2-S0-W1-K1", "H1/3-S7-W64-K200-scale"])
def test_exact_index_equals_brute_force(heads, heads_q, sinks, window, top_k, scale):
    n, dim, dim_v = 3000, 16, 12
    k, v = _randn(heads, n, dim, seed=4), _randn(heads, n, dim_v, seed=5)
    q = _randn(heads_q, 3, dim, seed=6)
    cache = _filled(k, v, num_sink_tokens=sinks, window=window, top_k=top_k, index="exact", scale=scale)
    expected = _brute_force(q, k, v, sinks=sinks, window=window, top_k=top_k, scale=scale)
    torch.testing.assert_close(cache.attend(q), expected, **CLOSE64)
    assert cache.last_scanned_fraction == 1.0
    found = cache.search(q)
    assert found.shape == (heads_q, 3, top_k) and found.dtype == torch.int64
    assert bool(((found >= sinks) & (found < n - window)).all())


# --------------------------------------------------------------------------- IVF

def test_ivf_recall_on_clustered_keys():
    heads, group, dim, n, top_k = 2, 2, 32, 20_000, 64
    centers, k, v = _clustered(heads, n, dim, n_clusters=128, seed=7)
    gen = torch.Generator().manual_seed(8)
    pick = torch.randint(0, 128, (heads, group * 4), generator=gen)
    q = centers.gather(1, pick[..., None].expand(-1, -1, dim)) + 0.5 * torch.randn(heads, group * 4, dim, generator=gen)
    q = q.reshape(heads * group, 4, dim)
    exact = _filled(k, v, top_k=top_k, window=128, index="exact")
    ivf = _filled(k, v, top_k=top_k, window=128, index="ivf")

    truth, found = exact.search(q), ivf.search(q)
    hits = (found[..., :, None] == truth[..., None, :]).any(-1).sum(-1)        # (Hq, n_q)
    recall = hits.double() / top_k
    assert recall.mean() >= 0.95 and recall.min() >= 0.8, recall

    out_ivf, out_exact = ivf.attend(q), exact.attend(q)
    stats = ivf.last_stats
    assert stats["trained"]
    assert stats["candidate_fraction"] <= 0.06, stats     # keys scored per query row
    assert (out_ivf - out_exact).abs().max() <= 0.05
    # A decode step (one query per query head) reads few keys per kv head: the
    # union of the lists its `group` query heads probe.
    torch.testing.assert_close(ivf.attend(q[:, :1]), out_ivf[:, :1])
    assert ivf.last_scanned_fraction <= 0.1, ivf.last_stats
    # Full attention over these keys is nowhere near: the retrieval carries the output.
    assert (out_exact - _full(q, k, v)).abs().max() > 0.05


def test_ivf_nprobe_and_n_lists():
    _, k, v = _clustered(1, 6000, 16, n_clusters=32, seed=9)
    q = _randn(2, 3, 16, seed=10, dtype=torch.float32)
    cache = _filled(k, v, top_k=16, window=64, index="ivf", n_lists=20, nprobe=2)
    cache.attend(q)
    stats = cache.last_stats
    assert stats["trained"] and stats["n_lists"] == 20 and stats["nprobe"] == 2
    assert stats["candidate_fraction"] < 0.5
    found = cache.search(q)
    assert found.shape == (2, 3, 16)
    assert bool(((found == -1) | ((found >= 4) & (found < 6000 - 64))).all())


# --------------------------------------------------------------------------- appends

@pytest.mark.parametrize("index", ["exact", "ivf"])
def test_chunked_appends_equal_one_append(index):
    heads, dim, n = 2, 16, 5000
    _, k, v = _clustered(heads, n, dim, n_clusters=40, seed=11)
    k, v = k.double(), v.double()
    q = _randn(2 * heads, 3, dim, seed=12)
    whole = _filled(k, v, top_k=24, window=64, index=index)

    chunked = RetrievalKVCache(heads, dim, top_k=24, window=64, index=index, dtype=F64)
    sizes = torch.randint(1, 300, (200,), generator=torch.Generator().manual_seed(13)).tolist()
    start = 0
    for i, size in enumerate(sizes):
        size = min(size, n - 80 - start)
        chunked.append(k[:, start:start + size], v[:, start:start + size])
        start += size
        if i % 7 == 0:
            chunked.attend(q)  # decoding interleaves attends: they must not change the result
        if start == n - 80:
            break
    for t in range(start, n):  # then token by token, as in decoding
        chunked.append(k[:, t:t + 1], v[:, t:t + 1])
        if t % 10 == 0:
            chunked.attend(q)
    assert len(chunked) == len(whole) == n
    assert torch.equal(chunked.search(q), whole.search(q))
    torch.testing.assert_close(chunked.attend(q), whole.attend(q), **CLOSE64)
    assert chunked.last_stats == whole.last_stats


def test_decode_steps():
    """Append one token, then attend with its query: the token sees itself."""
    heads, dim, n = 2, 8, 400
    k, v = _randn(heads, n, dim, seed=14), _randn(heads, n, dim, seed=15)
    q = _randn(heads, n, dim, seed=16)
    cache = RetrievalKVCache(heads, dim, num_sink_tokens=2, window=32, top_k=8, index="exact", dtype=F64)
    for t in range(n):
        cache.append(k[:, t:t + 1], v[:, t:t + 1])
        if t % 50 == 49:
            out = cache.attend(q[:, t:t + 1])
            expected = _brute_force(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], sinks=2, window=32, top_k=8)
            torch.testing.assert_close(out, expected, **CLOSE64)


def test_empty_cache_and_empty_append():
    cache = RetrievalKVCache(2, 8, head_dim_v=4)
    q = _randn(4, 3, 8, seed=17, dtype=torch.float32)
    assert len(cache) == 0
    out = cache.attend(q)
    assert out.shape == (4, 3, 4) and out.dtype == torch.float32 and not out.any()
    assert cache.search(q).shape == (4, 3, 0)

    k, v = _randn(2, 10, 8, seed=18, dtype=torch.float32), _randn(2, 10, 4, seed=19, dtype=torch.float32)
    cache.append(k[:, :0], v[:, :0])
    assert len(cache) == 0
    cache.append(k, v)
    before = cache.attend(q)
    cache.append(k[:, :0], v[:, :0])
    assert len(cache) == 10
    assert torch.equal(cache.attend(q), before)
    assert cache.attend(q[:, :0]).shape == (4, 0, 4)


def test_appended_views_are_copied():
    k, v = _randn(2, 40, 8, seed=20), _randn(2, 40, 8, seed=21)
    wide = torch.cat([k, k], -1).transpose(0, 1).contiguous().transpose(0, 1)[..., :8]   # non-contiguous view
    cache = RetrievalKVCache(2, 8, window=8, top_k=100, dtype=F64)
    cache.append(wide, v)
    wide.zero_()
    q = _randn(2, 2, 8, seed=22)
    torch.testing.assert_close(cache.attend(q), _full(q, k, v), **CLOSE64)


# --------------------------------------------------------------------------- dtypes, devices, grads

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("index", ["exact", "ivf"])
def test_low_precision_dtypes(dtype, index):
    heads, dim, n = 2, 16, 1800
    k, v = _randn(heads, n, dim, seed=23), _randn(heads, n, dim, seed=24)
    q = _randn(2 * heads, 2, dim, seed=25)
    low = _filled(k.to(dtype), v.to(dtype), top_k=n, window=64, index=index)
    out = low.attend(q.to(dtype))
    assert out.dtype == dtype
    expected = _full(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double())
    assert_close(out, expected, dtype)
    sparse = _filled(k.to(dtype), v.to(dtype), top_k=32, window=64, index=index)
    assert sparse.attend(q.to(dtype)).dtype == dtype


def test_gradient_reaches_q():
    k, v = _randn(1, 200, 6, seed=26), _randn(1, 200, 5, seed=27)
    cache = _filled(k, v, num_sink_tokens=2, window=20, top_k=8, index="exact")
    q = _randn(2, 2, 6, seed=28).requires_grad_(True)
    assert torch.autograd.gradcheck(cache.attend, (q,))


@pytest.mark.gpu
@pytest.mark.parametrize("store", ["cpu", "cuda"])
def test_cuda_queries(store):
    _, k, v = _clustered(2, 3000, 16, n_clusters=16, seed=29)
    q = _randn(4, 2, 16, seed=30, dtype=torch.float32)
    host = _filled(k, v, top_k=32, window=64)
    cache = RetrievalKVCache(2, 16, top_k=32, window=64, device=store)
    cache.append(k.cuda(), v.cuda())
    out = cache.attend(q.cuda())
    assert out.device.type == "cuda" and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), host.attend(q), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,error,words", [
    (dict(num_heads=0), ValueError, ["num_heads", "0"]),
    (dict(num_heads=2.0), TypeError, ["num_heads"]),
    (dict(head_dim=-1), ValueError, ["head_dim", "-1"]),
    (dict(head_dim_v=0), ValueError, ["head_dim_v"]),
    (dict(window=0), ValueError, ["window", ">= 1", "0"]),
    (dict(top_k=0), ValueError, ["top_k", ">= 1", "0"]),
    (dict(top_k=True), TypeError, ["top_k"]),
    (dict(num_sink_tokens=-1), ValueError, ["num_sink_tokens", ">= 0", "-1"]),
    (dict(index="hnsw"), ValueError, ["index", "hnsw", "ivf"]),
    (dict(index=None), TypeError, ["index"]),
    (dict(dtype=torch.int32), TypeError, ["dtype", "int32"]),
    (dict(dtype="float32"), TypeError, ["dtype"]),
    (dict(scale="x"), TypeError, ["scale"]),
    (dict(n_lists=0), ValueError, ["n_lists"]),
    (dict(nprobe=4, index="exact"), ValueError, ["nprobe", "exact"]),
    (dict(device="nowhere"), ValueError, ["device", "nowhere"]),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_constructor_arguments(kwargs, error, words):
    args = dict(num_heads=2, head_dim=8)
    args.update(kwargs)
    with pytest.raises(error) as info:
        RetrievalKVCache(args.pop("num_heads"), args.pop("head_dim"), **args)
    for word in words:
        assert word in str(info.value)


def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


@pytest.mark.parametrize("k,v,error,words", [
    (_t(8, 5), _t(2, 5, 4), ValueError, ["k", "3 dimensions", "(8, 5)"]),
    ([[0.0]], _t(2, 5, 4), TypeError, ["k", "Tensor"]),
    (_t(3, 5, 8), _t(3, 5, 4), ValueError, ["k", "num_heads=2", "(3, 5, 8)"]),
    (_t(2, 5, 7), _t(2, 5, 4), ValueError, ["k", "head_dim=8", "(2, 5, 7)"]),
    (_t(2, 5, 8), _t(2, 5, 8), ValueError, ["v", "head_dim_v=4", "(2, 5, 8)"]),
    (_t(2, 5, 8), _t(2, 6, 4), ValueError, ["v", "token count", "5", "(2, 6, 4)"]),
    (_t(2, 5, 8, dtype=F64), _t(2, 5, 4, dtype=F64), TypeError, ["k", "float32", "float64"]),
    (_t(2, 5, 8), _t(2, 5, 4, dtype=torch.float16), TypeError, ["v", "float32", "float16"]),
], ids=["k-rank", "k-list", "k-heads", "k-head_dim", "v-head_dim", "v-tokens", "k-dtype", "v-dtype"])
def test_bad_append(k, v, error, words):
    cache = RetrievalKVCache(2, 8, head_dim_v=4)
    cache.append(_t(2, 3, 8), _t(2, 3, 4))
    with pytest.raises(error) as info:
        cache.append(k, v)
    for word in words:
        assert word in str(info.value)
    assert len(cache) == 3


@pytest.mark.parametrize("q,error,words", [
    (_t(4, 8), ValueError, ["q", "3 dimensions"]),
    (_t(3, 1, 8), ValueError, ["q", "multiple of num_heads=2", "(3, 1, 8)"]),
    (_t(0, 1, 8), ValueError, ["q", "num_heads=2"]),
    (_t(4, 1, 6), ValueError, ["q", "head_dim=8", "(4, 1, 6)"]),
    (_t(4, 1, 8, dtype=torch.bfloat16), TypeError, ["q", "float32", "bfloat16"]),
    ("q", TypeError, ["q", "Tensor"]),
], ids=["rank", "heads", "no-heads", "head_dim", "dtype", "not-tensor"])
def test_bad_queries(q, error, words):
    cache = RetrievalKVCache(2, 8)
    cache.append(_t(2, 3, 8), _t(2, 3, 8))
    for method in (cache.attend, cache.search):
        with pytest.raises(error) as info:
            method(q)
        for word in words:
            assert word in str(info.value)
