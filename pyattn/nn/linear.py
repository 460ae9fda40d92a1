"""`LinearAttention`: a multi-head linear-attention layer on `pyattn.linear_attention`.

The layer is the usual projections around the op::

    q = x W_q^T (+ b_q)    k = x W_k^T (+ b_k)    v = x W_v^T (+ b_v)     (per head)
    o = linear_attention(q, k, v, feature_map=f, causal=...)              (API.md section 2)
    y = o W_o^T (+ b_o)

Causal layers are recurrent: the state ``(S, z)`` (``S`` float32
``(B, num_heads, F, head_dim)``, ``z`` float32 ``(B, num_heads, F)``, F the
feature dim) summarises every token seen, so ``forward`` can continue from a
state and `LinearAttention.step` decodes one token at a cost that does not grow
with the context.

Feature maps that live inside the layer (``"t2r"``, or a class) are applied
here, one map per key/value head, before the op; fixed maps (``"elu"``,
``"relu"``, ``"identity"``) go to the op by name so the kernels fuse them.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import feature_maps
from ..ops.linear import linear_attention

State = Tuple[torch.Tensor, torch.Tensor]

_FIXED_MAPS = ("identity", "elu", "relu")
_LEARNED_NAMES = ("t2r", "favor")
_FIXED_CLASSES = {feature_maps.ELU1: "elu", feature_maps.ReLU: "relu"}

__all__ = ["LinearAttention", "PerHeadFeatureMap"]


class PerHeadFeatureMap(nn.Module):
    """A separate feature map per key/value head, shared by the keys of that head and its queries.

    ``maps[j]`` maps the features of kv head ``j``. Called on a
    ``(B, H, S, D)`` tensor whose ``H`` is a multiple ``g * len(maps)`` of the
    number of maps (``g = 1`` for keys, the GQA group size for queries), query
    head ``h`` goes through ``maps[h // g]``: exactly the heads that
    ``linear_attention`` pairs, so ``f(q_h) . f(k_{h // g})`` is one kernel per head.

    When every map is a `pyattn.feature_maps.T2R` with one shape, all heads run
    as one batched matmul (the weights are stacked per call, which keeps the
    maps ordinary `T2R` modules with their own parameters).
    """

    def __init__(self, maps: Sequence[nn.Module]):
        super().__init__()
        if len(maps) == 0:
            raise ValueError("maps must hold at least one feature map")
        self.maps = nn.ModuleList(maps)

    @classmethod
    def t2r(cls, num_heads: int, head_dim: int, num_features: int) -> "PerHeadFeatureMap":
        """`num_heads` learned T2R maps ``relu(x W^T + b)``, ``W`` ``(num_features, head_dim)``."""
        return cls([feature_maps.T2R(head_dim, num_features) for _ in range(num_heads)])

    def _all_t2r(self) -> bool:
        first = self.maps[0]
        return all(type(m) is feature_maps.T2R and m.weight.shape == first.weight.shape for m in self.maps)

    def redraw_(self) -> "PerHeadFeatureMap":
        """Redraw every random-feature map (`Favor`) that asks for it."""
        for m in self.maps:
            if isinstance(m, feature_maps.Favor) and m.redraw:
                m.redraw_()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be (batch, heads, seq, head_dim), got shape {tuple(x.shape)}")
        b, h, s, d = x.shape
        n = len(self.maps)
        if h % n != 0:
            raise ValueError(f"x has {h} heads, not a multiple of the {n} per-head feature maps")
        g = h // n
        if self._all_t2r():
            weight = torch.stack([m.weight for m in self.maps]).to(x.dtype)          # (n, F, D)
            bias = torch.stack([m.bias for m in self.maps]).to(x.dtype)              # (n, F)
            grouped = x.reshape(b, n, g, s, d)
            out = torch.einsum("bngsd,nfd->bngsf", grouped, weight) + bias[None, :, None, None, :]
            return F.relu(out).reshape(b, h, s, -1)
        return torch.cat([m(x[:, j * g:(j + 1) * g]) for j, m in enumerate(self.maps)], 1)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


class LinearAttention(nn.Module):
    r"""Multi-head linear attention (Katharopoulos et al. 2020) on `pyattn.linear_attention`.

    Args:
        embed_dim: model width E; ``embed_dim % num_heads == 0``, ``head_dim = embed_dim // num_heads``.
        num_heads: query heads.
        feature_map: the kernel feature map ``f`` (``qf = f(q) * scale``, ``kf = f(k)``):

            * ``"elu"`` (default, ``elu + 1``), ``"relu"``, ``"identity"``: fixed,
              fused into the kernels;
            * ``"t2r"``: a learned `pyattn.feature_maps.T2R` ``relu(x W^T + b)``
              per kv head (Kasai et al. 2021), ``feature_dim`` features;
            * ``"favor"``: one FAVOR+ `pyattn.feature_maps.Favor` random projection
              for the layer (``feature_dim`` features; redrawn on every training
              forward), as Performer shares its projection across heads;
            * a class (e.g. ``pyattn.feature_maps.T2R`` or ``Favor``): instantiated
              as ``cls(head_dim, feature_dim)`` once per kv head (a `PerHeadFeatureMap`);
            * a module or callable instance: one map for all heads, applied to
              ``(B, H, S, head_dim)`` tensors (a module's parameters join the layer's).
        causal: causal (recurrent) attention; ``False`` lets every token see every
            token (and allows separate ``key``/``value`` inputs).
        num_kv_heads: key/value heads for grouped-query attention (default
            ``num_heads``); query head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``.
        feature_dim: feature dim F of ``"t2r"``, ``"favor"`` or a class; default ``head_dim``.
        bias: biases in the four projections.
        normalize, scale, eps: as in `pyattn.linear_attention` (``scale`` multiplies
            ``f(q)``; with ``normalize`` it only sets the size of ``eps``).
        kdim, vdim: feature sizes of ``key`` / ``value`` inputs (default ``embed_dim``).
        batch_first: inputs and outputs are ``(B, S, E)`` when True (the default,
            as in flash-linear-attention and Hugging Face models), ``(S, B, E)``
            when False (torch's `nn.MultiheadAttention` default).
        backend: the op's backend (None: the fastest that can run the inputs).

    Parameters ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (`nn.Linear`)
    and ``feature_map`` (when it is a module).
    """

    def __init__(self, embed_dim: int, num_heads: int, feature_map: Union[str, type, Callable] = "elu",
                 causal: bool = True, *, num_kv_heads: Optional[int] = None, feature_dim: Optional[int] = None,
                 bias: bool = True, normalize: bool = True, scale: float = 1.0, eps: float = 1e-6,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, batch_first: bool = True,
                 backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__()
        embed_dim = _check_positive_int("embed_dim", embed_dim)
        num_heads = _check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else _check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        for name, flag in (("causal", causal), ("bias", bias), ("normalize", normalize),
                           ("batch_first", batch_first)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        for name, number in (("scale", scale), ("eps", eps)):
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(number).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
        if not eps >= 0 or not math.isfinite(eps):
            raise ValueError(f"eps must be a finite float >= 0, got {eps}")
        kdim = embed_dim if kdim is None else _check_positive_int("kdim", kdim)
        vdim = embed_dim if vdim is None else _check_positive_int("vdim", vdim)
        if causal and (kdim != embed_dim or vdim != embed_dim):
            raise ValueError(f"kdim/vdim other than embed_dim ({embed_dim}) need causal=False (separate key/value "
                             f"inputs), got kdim={kdim}, vdim={vdim}")

        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.normalize, self.scale, self.eps = causal, normalize, float(scale), float(eps)
        self.kdim, self.vdim, self.batch_first, self.backend = kdim, vdim, batch_first, backend
        factory = dict(device=device, dtype=dtype)
        kv_width = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kdim, kv_width, bias=bias, **factory)
        self.v_proj = nn.Linear(vdim, kv_width, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

        self._fused: Optional[str] = None  # a map the op applies by name
        self.feature_map: Optional[Callable] = None
        self._per_head = False  # self.feature_map maps per kv head, applied here
        self._setup_feature_map(feature_map, feature_dim)
        if isinstance(self.feature_map, nn.Module) and (device is not None or dtype is not None):
            self.feature_map.to(device=device, dtype=dtype)
        self.feature_dim = self._feature_dim(feature_dim)

    def _setup_feature_map(self, feature_map, feature_dim) -> None:
        if feature_dim is not None:
            _check_positive_int("feature_dim", feature_dim)
        features = self.head_dim if feature_dim is None else feature_dim
        if isinstance(feature_map, str):
            if feature_map in _FIXED_MAPS:
                if feature_dim is not None:
                    raise ValueError(f"feature_dim applies to 't2r', 'favor' or a class; feature_map={feature_map!r} "
                                     f"keeps head_dim ({self.head_dim}) features")
                self._fused = feature_map
            elif feature_map == "t2r":
                self.feature_map, self._per_head = PerHeadFeatureMap.t2r(self.num_kv_heads, self.head_dim, features), True
            elif feature_map == "favor":
                self.feature_map = feature_maps.Favor(self.head_dim, features)
            else:
                raise ValueError(f"feature_map must be one of {list(_FIXED_MAPS + _LEARNED_NAMES)}, a class, a module "
                                 f"or a callable, got {feature_map!r}")
        elif isinstance(feature_map, type):
            if feature_map in _FIXED_CLASSES:
                self._fused = _FIXED_CLASSES[feature_map]
            elif issubclass(feature_map, nn.Module):
                self.feature_map = PerHeadFeatureMap(
                    [feature_map(self.head_dim, features) for _ in range(self.num_kv_heads)])
                self._per_head = True
            else:
                raise TypeError(f"feature_map as a class must be an nn.Module subclass taking (head_dim, feature_dim), "
                                f"got {feature_map.__name__}")
        elif callable(feature_map):
            if feature_dim is not None:
                raise ValueError("feature_dim applies to 't2r', 'favor' or a class, not to a feature_map instance")
            if type(feature_map) in _FIXED_CLASSES:
                self._fused = _FIXED_CLASSES[type(feature_map)]
            else:
                self.feature_map = feature_map
        else:
            raise TypeError(f"feature_map must be a string, a class, a module or a callable, "
                            f"got {type(feature_map).__name__}")

    def _feature_dim(self, feature_dim) -> Optional[int]:
        """F of the state, when the layer knows it without running (None for an opaque callable)."""
        if self._fused is not None:
            return self.head_dim
        if self._per_head:
            return self.head_dim if feature_dim is None else feature_dim
        if isinstance(self.feature_map, (feature_maps.Favor, feature_maps.T2R)):
            return self.feature_map.num_features
        return None

    def extra_repr(self) -> str:
        fmap = self._fused if self._fused is not None else type(self.feature_map).__name__
        kv = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}{kv}, feature_map={fmap}, "
                f"feature_dim={self.feature_dim}, causal={self.causal}, batch_first={self.batch_first}")

    # ----------------------------------------------------------------------- forward

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """(B, S, heads * head_dim) -> (B, heads, S, head_dim), a view."""
        b, s, _ = x.shape
        return x.view(b, s, heads, self.head_dim).transpose(1, 2)

    def _check_input(self, name: str, x, width: int) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        layout = "(batch, seq, " if self.batch_first else "(seq, batch, "
        if x.dim() != 3 or x.shape[-1] != width:
            raise ValueError(f"{name} must be {layout}{width}) with batch_first={self.batch_first}, "
                             f"got shape {tuple(x.shape)}")

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                *, state: Optional[State] = None, return_state: bool = False):
        """Attend ``query`` ``(B, S, E)`` (``(S, B, E)`` if not batch_first).

        ``key`` / ``value`` (non-causal layers only; default ``query`` / ``key``):
        separate inputs ``(B, S, kdim)`` / ``(B, S, vdim)`` of the query's length
        (the op pairs one key with each query position).
        ``state``: ``(S, z)`` to continue from (``None``: an empty context).
        Returns the output ``(B, S, E)``, or ``(output, state)`` when ``return_state``.
        """
        if not isinstance(return_state, bool):
            raise TypeError(f"return_state must be a bool, got {type(return_state).__name__}")
        self._check_input("query", query, self.embed_dim)
        if self.causal and (key is not None or value is not None):
            raise ValueError("key/value inputs need causal=False: a causal layer attends its own sequence (self-attention)")
        key = query if key is None else key
        value = key if value is None else value
        self._check_input("key", key, self.kdim)
        self._check_input("value", value, self.vdim)
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if key.shape[:2] != query.shape[:2] or value.shape[:2] != query.shape[:2]:
            raise ValueError(f"key and value must have the batch size and length of query {tuple(query.shape[:2])}, "
                             f"got {tuple(key.shape[:2])} and {tuple(value.shape[:2])} (batch-first)")

        q = self._heads(self.q_proj(query), self.num_heads)
        k = self._heads(self.k_proj(key), self.num_kv_heads)
        v = self._heads(self.v_proj(value), self.num_kv_heads)
        if self._fused is not None:
            fmap = self._fused
        elif self._per_head:
            if self.training:
                self.feature_map.redraw_()
            q, k, fmap = self.feature_map(q), self.feature_map(k), "identity"
        else:
            fmap = self.feature_map  # the op applies it (and redraws a training Favor)
        result = linear_attention(q, k, v, causal=self.causal, feature_map=fmap, normalize=self.normalize,
                                  scale=self.scale, eps=self.eps, initial_state=state,
                                  output_final_state=return_state, backend=self.backend)
        out, new_state = result if return_state else (result, None)
        b, h, s, d = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(b, s, h * d))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return (out, new_state) if return_state else out

    def step(self, x: torch.Tensor, state: Optional[State] = None) -> Tuple[torch.Tensor, State]:
        """Decode one token: ``x`` ``(B, E)`` with the state of the tokens before it -> ``(y (B, E), new state)``.

        The work and memory are those of one token whatever the context length
        (the state has a fixed size). ``step`` after ``forward(..., return_state=True)``
        continues that sequence; equal to running ``forward`` over all tokens at once.
        """
        if not self.causal:
            raise ValueError("step needs a causal layer (causal=True): a non-causal layer has no token order")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (batch, {self.embed_dim}), one token per sequence, got shape {tuple(x.shape)}")
        tokens = x[:, None] if self.batch_first else x[None]
        out, new_state = self.forward(tokens, state=state, return_state=True)
        return (out[:, 0] if self.batch_first else out[0]), new_state

    def initial_state(self, batch_size: int, *, device=None) -> State:
        """An empty state ``(S, z)`` of zeros (what ``state=None`` means), float32."""
        if self.feature_dim is None:
            raise ValueError("the feature dim of a custom feature_map callable is unknown before it runs; "
                             "pass state=None for the first call instead")
        device = self.q_proj.weight.device if device is None else device
        dtype = torch.float64 if self.q_proj.weight.dtype == torch.float64 else torch.float32
        return (torch.zeros(batch_size, self.num_heads, self.feature_dim, self.head_dim, device=device, dtype=dtype),
                torch.zeros(batch_size, self.num_heads, self.feature_dim, device=device, dtype=dtype))
