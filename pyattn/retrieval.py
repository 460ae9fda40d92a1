"""Retrieval-sparse KV cache for long-context decoding.

After RetrievalAttention (Liu et al. 2024, "RetrievalAttention: Accelerating
Long-Context LLM Inference via Vector Retrieval"). The stored tokens fall in
three regions::

    position:  0 .. S-1 | S ...................... n-W-1 | n-W ........ n-1
    region:    sinks    | middle (searched by the index)  | window (recent)
    attended:  exactly  | top_k keys per query row        | exactly

(`S = num_sink_tokens`, `W = window`, `n = len(cache)`.) For a query `q` of
query head `h`, using kv head `h // (heads_q // num_heads)`:

* dense part: softmax attention over the sinks and the window, giving
  `out_d` and its log-sum-exp `lse_d`;
* retrieved part: the index returns up to `top_k` middle keys with the highest
  logit `scale * q.k` among the keys it scans (all of them for
  `index="exact"`); softmax attention over them gives `out_r`, `lse_r`;
* the two partial attentions cover disjoint keys, so
  `merge_attention(out_d, lse_d, out_r, lse_r)` is the softmax attention over
  their union. When the middle holds at most `top_k` tokens, every stored
  token is attended and the result is full attention.

The IVF index (`index="ivf"`), one per kv head, is k-means over the middle
keys: `n_lists` centroids and, for each, the list of the keys nearest to it
(L2). A query row scores the centroids by inner product and probes the best
lists: `nprobe` of them, or by default as many as it takes to gather
`max(middle / 32, 8 * top_k)` candidate keys (about 3% of 100k middle keys);
it keeps the `top_k` candidates with the highest logits. The query rows of one
kv head (its GQA group, its queries) read the union of their lists once, as
one gather and one matmul. RetrievalAttention observes that queries and keys
are out of distribution for each other, so an index built over keys and
probed with queries can need many lists for a good recall (the paper builds an
attention-aware graph index instead). Plain IVF with inner-product probing is
what is done here; `nprobe` trades recall for speed, and `last_stats` reports
how many keys the last call read.

The index is maintained as tokens leave the window into the middle: new keys
go to their nearest centroid's list; k-means is retrained when the number of
middle keys reaches `1024 * 2**j`, so an append costs amortized O(n_lists)
centroid comparisons per key. The next `attend` sorts the keys new since the
last full sort by list; once they pass 1/32 of the lists, all keys are sorted
again (amortized O(log n) per key). Training uses the first
`1024 * 2**j` middle keys and a fixed seed, so appending tokens in chunks or
all at once builds the same index. Below 1024 middle keys the middle is
scanned exactly.

Storage: keys and values live on `device` (host memory by default, so the
context can exceed GPU memory) in capacity-doubling buffers. `attend` takes
queries on any device: it searches on `device`, moves only the selected and
the dense keys and values to the query's device, and computes there.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import validation
from .reference import merge_attention
from .validation import FLOAT_DTYPES

__all__ = ["RetrievalKVCache"]

_INDEXES = ("exact", "ivf")
# Middle keys before the IVF index is first trained; retrained at each doubling.
_MIN_TRAIN = 1024
# Default lists: 4 * sqrt(keys trained on), at least 32 training keys per list.
# Finer lists give a better recall for the same keys scanned; the training cost
# grows as lists^2, linear in the keys at this rate.
_LISTS_PER_SQRT = 4.0
_MIN_KEYS_PER_LIST = 32
# k-means runs on a sample of this many keys per list, for this many rounds.
_SAMPLE_PER_LIST = 16
_KMEANS_ITERS = 6
_SEED = 0x5EED
# Default probing: lists until a query row has max(middle / 32, 8 * top_k) candidates.
_SCAN_FRACTION = 32
_CANDIDATES_PER_TOPK = 8
# Rebuild the sorted lists once the unsorted tail passes 1/32 of them.
_TAIL_FRACTION = 32
# Elements in one block of: search scores; gathered keys; centroid distances.
_BUDGET = 1 << 24
_GATHER_BLOCK = 1 << 21
_NEAREST_BLOCK = 1 << 20


def _what(x) -> str:
    return f"{type(x).__name__} {x!r}"


def _optional_positive_int(name: str, value) -> Optional[int]:
    return None if value is None else validation.positive_int(name, value)


class RetrievalKVCache:
    """A KV cache whose `attend` is exact on the sinks and recent window and
    retrieves the `top_k` best older keys per query through a vector index.

    Args:
        num_heads: kv heads stored (queries may have a multiple of it: GQA).
        head_dim: key (and query) head dimension.
        head_dim_v: value head dimension (default `head_dim`).
        num_sink_tokens: first tokens always attended exactly (>= 0).
        window: most recent tokens always attended exactly (>= 1).
        top_k: middle keys retrieved per query row and query head (>= 1).
        index: `"ivf"` (inverted file, scans a small fraction of the keys) or
            `"exact"` (scans every middle key: the ground truth for the top_k).
        device: where keys, values and the index are stored (default host memory).
        dtype: dtype of the stored keys and values; appended k/v and the
            queries must have it.
        scale: softmax scale, `None` means `1 / sqrt(head_dim)`.
        n_lists: IVF lists per kv head (default 4 * sqrt(keys trained on),
            re-chosen at each retraining; never more than 1/32 of the keys
            trained on). IVF only.
        nprobe: IVF lists probed per query row (default: the best lists until
            the row has max(middle / 32, 8 * top_k) candidate keys, at most
            four times as many lists as that takes on average). IVF only.

    Usage (decoding)::

        cache.append(k_prompt, v_prompt)
        for step in ...:
            cache.append(k_new, v_new)    # the new token's own k/v first:
            out = cache.attend(q_new)     # every query sees every stored token

    No causal mask applies among the stored tokens. Gradients flow to `q`
    through the attended keys (the selection itself is not differentiable);
    appended k/v are stored detached. `search(q)` returns the positions of the
    middle tokens `attend(q)` retrieves.

    Memory: the key/value buffers grow by doubling; the IVF index adds the
    centroids and 8 bytes per middle token and kv head (its list, its slot).

    After each `attend`, `last_stats` holds: `stored`, `middle` (middle keys),
    `scanned` (middle keys read per kv head, the union over its query rows),
    `scanned_fraction` (`scanned / middle`; also `last_scanned_fraction`),
    `candidates` and `candidate_fraction` (middle keys scored per query row),
    `n_lists`, `nprobe` (lists probed per query row, mean) and `trained`
    (whether the IVF index was used rather than an exact scan). With an empty
    middle the fractions are 0; when every middle key is attended they are 1.
    """

    def __init__(self, num_heads: int, head_dim: int, *, head_dim_v: Optional[int] = None,
                 num_sink_tokens: int = 4, window: int = 512, top_k: int = 256, index: str = "ivf",
                 device="cpu", dtype: torch.dtype = torch.float32, scale: Optional[float] = None,
                 n_lists: Optional[int] = None, nprobe: Optional[int] = None):
        self._num_heads = validation.positive_int("num_heads", num_heads)
        self._head_dim = validation.positive_int("head_dim", head_dim)
        self._head_dim_v = head_dim if head_dim_v is None else validation.positive_int("head_dim_v", head_dim_v)
        self._num_sink_tokens = validation.positive_int("num_sink_tokens", num_sink_tokens, minimum=0)
        self._window = validation.positive_int("window", window)
        self._top_k = validation.positive_int("top_k", top_k)
        if not isinstance(index, str):
            raise TypeError(f"index must be a str, one of {_INDEXES}, got {_what(index)}")
        if index not in _INDEXES:
            raise ValueError(f"index must be one of {_INDEXES}, got {index!r}")
        self._index = index
        if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
            expected = ", ".join(str(d) for d in FLOAT_DTYPES)
            raise TypeError(f"dtype must be one of ({expected}), got {_what(dtype)}")
        self._dtype = dtype
        self._scale = validation.scale(scale, self._head_dim)
        self._n_lists = _optional_positive_int("n_lists", n_lists)
        self._nprobe = _optional_positive_int("nprobe", nprobe)
        if index != "ivf" and (n_lists is not None or nprobe is not None):
            raise ValueError(f"n_lists and nprobe apply to index='ivf' only, got index={index!r} with "
                             f"n_lists={n_lists!r}, nprobe={nprobe!r}")
        if not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be a str or torch.device, got {_what(device)}")
        try:
            self._device = torch.device(device)
            empty = torch.empty(0, device=self._device)
        except (RuntimeError, AssertionError) as err:
            raise ValueError(f"device must name an available device, got {device!r} ({err})") from None
        self._device = empty.device  # "cuda" -> "cuda:0"

        h = self._num_heads
        self._k = torch.empty(h, 0, self._head_dim, device=self._device, dtype=dtype)
        self._v = torch.empty(h, 0, self._head_dim_v, device=self._device, dtype=dtype)
        self._len = 0
        # IVF state; key ids are absolute token positions.
        self._centroids: Optional[torch.Tensor] = None   # (H, D, L) float32, transposed for matmuls
        self._neg_half_sq: Optional[torch.Tensor] = None # (H, 1, L): -|c|^2 / 2
        self._trained_on = 0                             # middle keys k-means used
        self._assign = torch.empty(h, 0, dtype=torch.int32, device=self._device)  # list of middle key j
        self._n_indexed = 0                              # middle keys with a list
        # Key ids sorted by list: [0, n_main) the main run, [n_main, n_indexed) the tail run.
        self._sorted = torch.empty(h, 0, dtype=torch.int32, device=self._device)
        self._n_main = 0
        self._main_off: Optional[torch.Tensor] = None    # (H, L + 1) int64 list offsets
        self._tail_off: Optional[torch.Tensor] = None
        self._tail_upto = 0                              # n_indexed when the tail run was sorted
        self._scratch: Optional[torch.Tensor] = None     # gathered keys of one search block
        self.last_stats: dict = {}

    # ----------------------------------------------------------------- properties

    num_heads = property(lambda self: self._num_heads)
    head_dim = property(lambda self: self._head_dim)
    head_dim_v = property(lambda self: self._head_dim_v)
    num_sink_tokens = property(lambda self: self._num_sink_tokens)
    window = property(lambda self: self._window)
    top_k = property(lambda self: self._top_k)
    index = property(lambda self: self._index)
    device = property(lambda self: self._device)
    dtype = property(lambda self: self._dtype)
    scale = property(lambda self: self._scale)

    @property
    def last_scanned_fraction(self) -> float:
        """Fraction of the middle keys the last `attend` read per kv head (see `last_stats`)."""
        return self.last_stats.get("scanned_fraction", 0.0)

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return (f"RetrievalKVCache(num_heads={self._num_heads}, head_dim={self._head_dim}, "
                f"head_dim_v={self._head_dim_v}, num_sink_tokens={self._num_sink_tokens}, "
                f"window={self._window}, top_k={self._top_k}, index={self._index!r}, "
                f"device={str(self._device)!r}, dtype={self._dtype}, len={self._len})")

    # ----------------------------------------------------------------- regions

    def _regions(self):
        """(sinks end, window start): the middle is [sinks end, window start)."""
        s = min(self._num_sink_tokens, self._len)
        return s, max(s, self._len - self._window)

    # ----------------------------------------------------------------- append

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store `k` (num_heads, n, head_dim) and `v` (num_heads, n, head_dim_v)."""
        self._check_kv(k, v)
        n = k.shape[1]
        if n == 0:
            return
        self._reserve(self._len + n)
        self._k[:, self._len:self._len + n].copy_(k.detach())
        self._v[:, self._len:self._len + n].copy_(v.detach())
        self._len += n
        if self._index == "ivf":
            self._update_index()

    def _check_kv(self, k, v) -> None:
        validation.tensor("k", k, ndim=3)
        validation.tensor("v", v, ndim=3)
        for name, x in (("k", k), ("v", v)):
            if x.dtype != self._dtype:
                raise TypeError(f"{name} must have the cache dtype {self._dtype}, got {x.dtype}")
        if v.device != k.device:
            raise ValueError(f"v must be on the device of k ({k.device}), got {v.device}")
        for name, x, dim, dim_name in (("k", k, self._head_dim, "head_dim"),
                                       ("v", v, self._head_dim_v, "head_dim_v")):
            if x.shape[0] != self._num_heads:
                raise ValueError(f"{name} must have num_heads={self._num_heads} heads in dim 0 "
                                 f"(shape (num_heads, n, {dim_name})), got shape {tuple(x.shape)}")
            if x.shape[2] != dim:
                raise ValueError(f"{name} must have {dim_name}={dim} in dim 2, got shape {tuple(x.shape)}")
        if v.shape[1] != k.shape[1]:
            raise ValueError(f"v must have the token count of k ({k.shape[1]}) in dim 1, "
                             f"got shape {tuple(v.shape)}")

    def _reserve(self, needed: int) -> None:
        """Grow the key/value buffers by doubling so appends cost amortized O(n)."""
        cap = self._k.shape[1]
        if needed <= cap:
            return
        cap = max(needed, 2 * cap, 64)
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], cap, old.shape[2])
            new[:, :self._len].copy_(old[:, :self._len])
            setattr(self, name, new)

    # ----------------------------------------------------------------- IVF index

    def _lists_for(self, trained_on: int) -> int:
        cap = max(1, trained_on // _MIN_KEYS_PER_LIST)
        wanted = self._n_lists if self._n_lists is not None else round(_LISTS_PER_SQRT * math.sqrt(trained_on))
        return max(1, min(wanted, cap))

    def _scan_budget(self, n_mid: int) -> int:
        """Candidate keys a query row scans by default (see the class docstring)."""
        return max(math.ceil(n_mid / _SCAN_FRACTION), _CANDIDATES_PER_TOPK * self._top_k)

    @torch.no_grad()
    def _update_index(self) -> None:
        s, w0 = self._regions()
        n_mid = w0 - s
        if n_mid < _MIN_TRAIN:
            return
        trained_on = _MIN_TRAIN
        while trained_on * 2 <= n_mid:
            trained_on *= 2
        if trained_on != self._trained_on:
            self._train(s, trained_on)
            self._n_indexed = 0
        if self._n_indexed < n_mid:
            self._add_to_lists(s, self._n_indexed, n_mid)

    def _train(self, s: int, trained_on: int) -> None:
        """k-means (L2) on a seeded sample of the first `trained_on` middle keys, per kv head."""
        n_lists = self._lists_for(trained_on)
        gen = torch.Generator().manual_seed(_SEED + trained_on)
        n_sample = min(trained_on, _SAMPLE_PER_LIST * n_lists)
        sample = torch.randperm(trained_on, generator=gen)[:n_sample].to(self._device)
        x = self._k[:, s:s + trained_on][:, sample].to(torch.float32)  # [H, S, D]
        c = x[:, :n_lists].clone()                                     # [H, L, D]
        h = self._num_heads
        head_base = torch.arange(h, device=self._device)[:, None] * n_lists
        for _ in range(_KMEANS_ITERS):
            flat = (head_base + _nearest(x, *_centroid_terms(c))).reshape(-1)   # [H * S]
            sums = torch.zeros(h * n_lists, x.shape[2], device=self._device)
            sums.index_add_(0, flat, x.reshape(-1, x.shape[2]))
            counts = torch.bincount(flat, minlength=h * n_lists).view(h, n_lists, 1)
            # An empty list restarts at a random sample key, which most likely
            # lies in a big cluster: that cluster gets split.
            restart = x[:, torch.randint(0, n_sample, (n_lists,), generator=gen).to(self._device)]
            c = torch.where(counts > 0, sums.view(h, n_lists, -1) / counts.clamp(min=1), restart)
        self._centroids, self._neg_half_sq = _centroid_terms(c)
        self._trained_on = trained_on
        self._n_main = self._tail_upto = 0
        self._main_off = self._tail_off = None

    def _add_to_lists(self, s: int, lo: int, hi: int) -> None:
        """Assign middle keys [lo, hi) to their nearest list."""
        if hi > self._assign.shape[1]:
            cap = max(hi, 2 * self._assign.shape[1], 1024)
            for name in ("_assign", "_sorted"):
                old = getattr(self, name)
                new = old.new_empty(old.shape[0], cap)
                new[:, :old.shape[1]].copy_(old)
                setattr(self, name, new)
        assign = _nearest(self._k[:, s + lo:s + hi].to(torch.float32), self._centroids, self._neg_half_sq)
        self._assign[:, lo:hi].copy_(assign)
        self._n_indexed = hi

    def _sorted_run(self, lo: int, hi: int, s: int):
        """Sort middle keys [lo, hi) by list into `_sorted[:, lo:hi]`; return list offsets [H, L + 1]."""
        h, n_lists = self._num_heads, self._centroids.shape[2]
        assign = self._assign[:, lo:hi]
        order = torch.sort(assign, dim=1, stable=True).indices
        self._sorted[:, lo:hi].copy_(order + (s + lo))
        head_base = torch.arange(h, device=self._device)[:, None] * n_lists
        counts = torch.bincount((assign.long() + head_base).reshape(-1), minlength=h * n_lists)
        offsets = torch.zeros(h, n_lists + 1, dtype=torch.int64, device=self._device)
        offsets[:, 1:] = counts.view(h, n_lists).cumsum(1)
        return offsets

    def _refresh_lists(self, s: int) -> None:
        """Make the sorted runs cover every indexed key (called lazily by `attend`)."""
        n = self._n_indexed
        if self._n_main == n or (self._tail_upto == n and self._tail_off is not None):
            return
        if self._main_off is None or (n - self._n_main) * _TAIL_FRACTION > self._n_main:
            self._main_off = self._sorted_run(0, n, s)
            self._n_main, self._tail_off = n, None
        else:
            self._tail_off = self._sorted_run(self._n_main, n, s)
        self._tail_upto = n

    def _ivf_candidates(self, q: torch.Tensor, budget: int):
        """Middle keys in the lists probed by the query rows of each kv head.

        q [H, R, D] float32 (scaled). Each row probes the lists with the
        highest `q . centroid`: `nprobe` of them, or by default as many as it
        takes to reach `budget` keys. The candidates of a kv head are the keys of
        the union of its rows' lists, so each key is read once however many rows
        want it. Returns ids [H, M] int64 (padded to the largest union), their
        validity [H, M], `keep` [H, R, M] (whether the key lies in a list that
        row probed) and the number of (row, list) probes.
        """
        h, n_rows = q.shape[0], q.shape[1]
        n_lists = self._centroids.shape[2]
        scores = torch.bmm(q, self._centroids)                         # [H, R, L]
        member = torch.zeros(h, n_rows, n_lists, dtype=torch.bool, device=self._device)
        if self._nprobe is not None:
            member.scatter_(2, scores.topk(min(self._nprobe, n_lists), dim=-1).indices, True)
        else:
            # Best lists first until the row has `budget` candidates (at least one
            # list, at most 4x the lists of average size the budget needs).
            cap = min(n_lists, 4 * math.ceil(budget * n_lists / self._n_indexed) + 1)
            best = scores.topk(cap, dim=-1).indices                    # [H, R, P], best first
            sizes = self._list_sizes()[:, None, :].expand(h, n_rows, -1).gather(2, best)
            member.scatter_(2, best, (sizes.cumsum(2) - sizes) < budget)
        probed = member.any(1)                                         # [H, L]
        n_union = probed.sum(1)                                        # [H]
        width = int(n_union.max())
        # The probed lists of each head, padded with list 0 (given no length).
        where = probed.nonzero()                                       # [(head, list)], by head
        first = n_union.cumsum(0) - n_union
        lists = torch.zeros(h, width, dtype=torch.int64, device=self._device)
        lists[where[:, 0], torch.arange(where.shape[0], device=self._device) - first[where[:, 0]]] = where[:, 1]
        used = torch.arange(width, device=self._device) < n_union[:, None]
        starts, lens = [], []
        for off, base in self._runs():
            lo = off.gather(1, lists)
            starts.append(lo + base)
            lens.append(torch.where(used, off.gather(1, lists + 1) - lo, 0))
        slot, valid = _ragged_ranges(torch.cat(starts, 1), torch.cat(lens, 1))   # [H, M]
        ids = self._sorted.gather(1, slot).long()
        if n_rows == 1:
            keep = valid[:, None, :]
        else:
            key_list = self._assign.gather(1, ids - self._regions()[0]).long()
            keep = member.gather(2, key_list[:, None, :].expand(h, n_rows, -1)) & valid[:, None, :]
        return ids, valid, keep, float(member.sum())

    def _list_sizes(self) -> torch.Tensor:
        """Keys in each list [H, L]."""
        return sum(off[:, 1:] - off[:, :-1] for off, _ in self._runs())

    def _runs(self):
        """(list offsets [H, L + 1], first slot) of each sorted run of `_sorted`."""
        runs = [(self._main_off, 0)]
        if self._tail_off is not None and self._n_main < self._n_indexed:
            runs.append((self._tail_off, self._n_main))
        return runs

    # ----------------------------------------------------------------- attend

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """Attention of `q` (heads_q, n_q, head_dim) over every stored token.

        Returns (heads_q, n_q, head_dim_v) on q's device and dtype; zeros for an
        empty cache.
        """
        rows, s, w0 = self._start(q)
        hq, n_q = q.shape[0], q.shape[1]
        if self._len == 0 or n_q == 0:
            return q.new_zeros(hq, n_q, self._head_dim_v)
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        if w0 - s <= self._top_k:
            # Nothing to search: every stored token is attended exactly.
            out, _ = self._dense(rows.to(compute), 0, 0)
            return out.to(q.dtype).reshape(hq, n_q, self._head_dim_v)
        outs = []
        for block, ids, valid in self._select(rows, s, w0):
            out_d, lse_d = self._dense(block.to(compute), s, w0)
            out_r, lse_r = self._retrieved(block.to(compute), ids, valid)
            outs.append(merge_attention(out_d, lse_d, out_r, lse_r)[0])
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        return out.to(q.dtype).reshape(hq, n_q, self._head_dim_v)

    def search(self, q: torch.Tensor) -> torch.Tensor:
        """Positions of the middle tokens `attend(q)` retrieves for each query.

        Returns int64 (heads_q, n_q, k) on q's device, k = min(top_k, middle
        tokens), in decreasing order of logit, -1 where the index found fewer
        than k candidates. When the middle holds at most `top_k` tokens, all of
        them, in order. Sinks and window tokens are not listed (always attended).
        """
        rows, s, w0 = self._start(q)
        hq, n_q = q.shape[0], q.shape[1]
        n_mid = w0 - s
        k = min(self._top_k, n_mid)
        if n_q == 0:
            return torch.empty(hq, 0, k, dtype=torch.int64, device=q.device)
        if n_mid <= self._top_k:
            return torch.arange(s, w0, device=q.device).expand(hq, n_q, k).clone()
        parts = []
        for _, ids, valid in self._select(rows, s, w0):
            if valid is not None:
                ids = ids.masked_fill(~valid, -1)
            parts.append(torch.nn.functional.pad(ids, (0, k - ids.shape[2]), value=-1))
        found = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return found.reshape(hq, n_q, k).to(q.device)

    def _start(self, q: torch.Tensor):
        """Check q, reset `last_stats`; return its rows [H, G * n_q, D] and the regions."""
        validation.tensor("q", q, ndim=3)
        if q.dtype != self._dtype:
            raise TypeError(f"q must have the cache dtype {self._dtype}, got {q.dtype}")
        hq, n_q, d = q.shape
        h = self._num_heads
        if hq == 0 or hq % h != 0:
            raise ValueError(f"q must have a positive multiple of num_heads={h} heads in dim 0 (GQA), "
                             f"got shape {tuple(q.shape)}")
        if d != self._head_dim:
            raise ValueError(f"q must have head_dim={self._head_dim} in dim 2, got shape {tuple(q.shape)}")
        s, w0 = self._regions()
        n_mid = w0 - s
        full = 1.0 if n_mid else 0.0     # every middle key is attended until top_k is exceeded
        self.last_stats = {"stored": self._len, "middle": n_mid, "scanned": float(n_mid), "scanned_fraction": full,
                           "candidates": float(n_mid), "candidate_fraction": full, "n_lists": 0, "nprobe": 0.0,
                           "trained": False}
        # Row g * n_q + i of kv head j is query i of query head j * G + g.
        return q.reshape(h, (hq // h) * n_q, d), s, w0

    def _select(self, rows: torch.Tensor, s: int, w0: int):
        """Yield (rows block [H, r, D], ids [H, r, k], validity or None) over blocks of query rows."""
        h, n_rows, n_mid = self._num_heads, rows.shape[1], w0 - s
        budget = 0
        if self._index == "ivf" and self._centroids is not None:
            self._refresh_lists(s)
            budget = self._scan_budget(n_mid)
            self.last_stats.update(n_lists=self._centroids.shape[2], trained=True)
        row_cost = max(n_mid, self._top_k * (self._head_dim + self._head_dim_v),
                       self._num_sink_tokens + self._window)
        step = max(1, _BUDGET // (h * row_cost))
        read, scored, probed, blocks = 0.0, 0.0, 0.0, 0
        for r in range(0, n_rows, step):
            block = rows[:, r:r + step]
            ids, valid, counts = self._search(block, s, w0, budget)
            read, scored, probed, blocks = read + counts[0], scored + counts[1], probed + counts[2], blocks + 1
            yield block, ids, valid
        read /= h * blocks
        scored /= h * n_rows
        self.last_stats.update(scanned=read, scanned_fraction=read / n_mid, candidates=scored,
                               candidate_fraction=scored / n_mid, nprobe=probed / (h * n_rows))

    def _dense(self, rows: torch.Tensor, s: int, w0: int):
        """Exact attention of rows [H, R, D] over the sinks [0, s) and the tail [w0, len)."""
        keys = torch.cat([self._k[:, :s], self._k[:, w0:self._len]], dim=1)
        values = torch.cat([self._v[:, :s], self._v[:, w0:self._len]], dim=1)
        keys = keys.to(rows.device, rows.dtype)
        values = values.to(rows.device, rows.dtype)
        logits = torch.bmm(rows, keys.transpose(1, 2)) * self._scale
        return _softmax_attend(logits, values)

    @torch.no_grad()
    def _search(self, rows: torch.Tensor, s: int, w0: int, budget: int):
        """Middle keys kept for each query row: exact scan, or IVF when `budget` > 0.

        Returns ids [H, R, k] (absolute positions), their validity [H, R, k]
        (None when all are valid) and counts summed over heads and rows:
        (middle keys read per kv head, candidates scored per row, lists probed per row).
        """
        h, n_rows = rows.shape[0], rows.shape[1]
        n_mid = w0 - s
        if budget == 0:
            # Exact scan of every middle key, in the cache dtype.
            q = rows.to(self._device, self._dtype) * self._scale
            logits = q.new_empty(h, n_mid, n_rows)
            # One matmul per head: a head's keys are contiguous, a batch of
            # heads is strided, which low-precision CPU matmuls handle slowly.
            for j in range(h):
                torch.mm(self._k[j, s:w0], q[j].T, out=logits[j])
            ids = logits.topk(self._top_k, dim=1).indices.transpose(1, 2) + s
            return ids, None, (float(h * n_mid), float(h * n_rows * n_mid), 0.0)
        q = rows.to(self._device, torch.float32) * self._scale
        ids, valid, keep, n_probed = self._ivf_candidates(q, budget)   # [H, M], [H, M], [H, R, M]
        width = ids.shape[1]
        logits = q.new_empty(h, n_rows, width)
        # Gather keys block by block into one reused buffer: reading the scanned
        # keys, not allocating fresh memory for them, is what a step costs.
        step = max(1, _GATHER_BLOCK // (h * self._head_dim))
        if self._scratch is None:
            self._scratch = self._k.new_empty(h * step * self._head_dim)
        rows_of = self._k.view(-1, self._head_dim)
        base = self._k_row_base().view(h, 1)
        for c in range(0, width, step):
            index = (ids[:, c:c + step] + base).view(-1)
            keys = torch.index_select(rows_of, 0, index,
                                      out=self._scratch[:index.numel() * self._head_dim].view(-1, self._head_dim))
            keys = keys.view(h, -1, self._head_dim).to(torch.float32)
            logits[:, :, c:c + step] = torch.bmm(q, keys.transpose(1, 2))
        logits.masked_fill_(~keep, -math.inf)
        top = logits.topk(min(self._top_k, width), dim=-1)
        kept = ids.gather(1, top.indices.view(h, -1)).view_as(top.indices)
        return kept, top.values > -math.inf, (float(valid.sum()), float(keep.sum()), n_probed)

    def _k_row_base(self) -> torch.Tensor:
        """Per-head row offset into the flattened [H * capacity, D] buffers."""
        return torch.arange(self._num_heads, device=self._device)[:, None, None] * self._k.shape[1]

    def _retrieved(self, rows: torch.Tensor, ids: torch.Tensor, valid: Optional[torch.Tensor]):
        """Exact attention of each row [H, R, D] over its own retrieved keys ids [H, R, k]."""
        flat = (ids + self._k_row_base()).reshape(-1)
        keys = self._k.view(-1, self._head_dim).index_select(0, flat)
        values = self._v.view(-1, self._head_dim_v).index_select(0, flat)
        keys = keys.view(*ids.shape, self._head_dim).to(rows.device, rows.dtype)            # [H, R, k, D]
        values = values.view(*ids.shape, self._head_dim_v).to(rows.device, rows.dtype)      # [H, R, k, Dv]
        logits = torch.matmul(keys, rows[..., None]).squeeze(-1) * self._scale
        if valid is not None:
            logits = logits.masked_fill(~valid.to(rows.device), -math.inf)
        return _softmax_attend(logits, values)


def _centroid_terms(c: torch.Tensor):
    """Centroids c [H, L, D] as used by `_nearest`: transposed [H, D, L] and -|c|^2 / 2 [H, 1, L]."""
    return c.transpose(1, 2).contiguous(), -0.5 * (c * c).sum(-1)[:, None, :]


def _nearest(x: torch.Tensor, c_t: torch.Tensor, neg_half_sq: torch.Tensor) -> torch.Tensor:
    """Index of the L2-nearest centroid, argmax_c x.c - |c|^2 / 2, for x [H, N, D]."""
    # Blocks of distances small enough to stay in cache between bmm and argmax.
    step = max(1, _NEAREST_BLOCK // (c_t.shape[0] * c_t.shape[2]))
    parts = [torch.bmm(x[:, i:i + step], c_t).add_(neg_half_sq).argmax(-1) for i in range(0, x.shape[1], step)]
    return torch.cat(parts, dim=1)


def _ragged_ranges(starts: torch.Tensor, lens: torch.Tensor):
    """Concatenate the integer ranges [starts, starts + lens) of each row, padded.

    starts, lens [B, n] int64. Returns values [B, M] (0 in the padding) and
    their validity [B, M], where M is the largest total length. Output slot p
    of range i holds p + (starts_i - offset_i): a cumulative sum of jumps at
    the range boundaries (an empty range's jumps cancel).
    """
    ends = lens.cumsum(1)
    offsets = ends - lens
    total = ends[:, -1:]                                               # [B, 1]
    width = int(total.max())
    shift = starts - offsets
    jumps = torch.zeros(starts.shape[0], width + 1, dtype=starts.dtype, device=starts.device)
    jumps.scatter_add_(1, offsets, shift)
    jumps.scatter_add_(1, ends, -shift)
    pos = torch.arange(width, device=starts.device)
    valid = pos < total
    return torch.where(valid, jumps[:, :width].cumsum(1) + pos, 0), valid


def _softmax_attend(logits: torch.Tensor, values: torch.Tensor):
    """Softmax attention from logits [H, R, m] and values [H, m, Dv] or [H, R, m, Dv].

    Returns out [H, R, Dv] and lse [H, R] (-inf, with a zero output, where every logit is -inf).
    """
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - lse.masked_fill(lse == -math.inf, 0)[..., None])
    if values.dim() == 3:
        out = torch.bmm(p, values)
    else:
        out = torch.matmul(p[..., None, :], values).squeeze(-2)
    return out, lse

