"""Feature maps for linear attention (API.md section 2).

A feature map `f` turns a query or key of shape `(..., head_dim)` into a
non-negative feature vector `(..., num_features)`, so that `f(q) . f(k)` stands
in for the softmax kernel `exp(q . k)` (or some other similarity) and attention
can be computed as a recurrence over a fixed-size state.

* `"identity"`: `f(x) = x`.
* `"elu"` / `ELU1()`: `f(x) = elu(x) + 1` (Katharopoulos et al. 2020).
* `"relu"` / `ReLU()`: `f(x) = relu(x)`.
* `Favor(head_dim, num_features)`: Performer FAVOR+ positive orthogonal random
  features (Choromanski et al. 2021), an unbiased estimate of `exp(q.k / sqrt(d))`.
* `T2R(head_dim, num_features)`: learned `relu(x W^T + b)` (Kasai et al. 2021),
  used to turn a pretrained softmax transformer into a recurrent one.

`resolve(feature_map)` maps any accepted value to a callable.

Modules with parameters or buffers compute in the dtype of their input (their
float32 weights are cast per call, and the cast is differentiable), so one
module serves float16/bfloat16 inputs upcast to float32 and float64 inputs
in gradient checks alike.
"""
from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ELU1", "ReLU", "Favor", "T2R", "resolve", "identity", "elu1", "relu"]


def identity(x: torch.Tensor) -> torch.Tensor:
    """`f(x) = x`."""
    return x


def elu1(x: torch.Tensor) -> torch.Tensor:
    """`f(x) = elu(x) + 1`: positive everywhere, linear for x > 0."""
    return F.elu(x) + 1.0


def relu(x: torch.Tensor) -> torch.Tensor:
    """`f(x) = max(x, 0)`."""
    return F.relu(x)


class ELU1(nn.Module):
    """`elu(x) + 1`, the feature map of "Transformers are RNNs" (Katharopoulos et al. 2020)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return elu1(x)


class ReLU(nn.Module):
    """`relu(x)`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu(x)


class Favor(nn.Module):
    r"""Performer FAVOR+ positive orthogonal random features (Choromanski et al. 2021).

    With `x` scaled by `head_dim ** -0.25` (so that `x_q . x_k = q . k / sqrt(d)`)
    and random rows `w_1..w_m` (`m = num_features`)::

        phi(x)_r = exp(w_r . x - |x|^2 / 2) / sqrt(m)

    `E[phi(q) . phi(k)] = exp(q . k / sqrt(d))` when `w_r ~ N(0, I)`. The rows are
    drawn in blocks of `head_dim` exactly orthogonal directions (QR of a
    Gaussian matrix), each row then rescaled by the norm of an independent
    `N(0, I_d)` vector (chi-distributed), which keeps the estimate unbiased and
    lowers its variance. The projection lives in the buffer `projection`
    `(num_features, head_dim)`.

    Numerical stability: since `w.x - |x|^2/2 = |w|^2/2 - |x - w|^2/2`, the
    exponent never exceeds `|w_r|^2 / 2`, a bound that depends on the features
    only; it can still overflow float32 for large `head_dim`. The exponent is
    therefore clamped at `MAX_EXPONENT` (30: features stay below `e^30`, so
    states summed over millions of tokens stay finite in float32). The clamp is
    inactive for all but near-degenerate inputs (a scaled query within
    `|w|^2/2 - 30` of a feature direction), so in practice it changes nothing;
    and because each token's features depend on that token alone (no per-batch
    or per-sequence maximum is subtracted, as the Performer code does for keys),
    the same features come out whether a sequence runs in chunks or one token at
    a time. A data-independent common shift `c` would cancel in the normalized
    output only up to `eps` (numerator and denominator both scale by `e^{-2c}`)
    and not at all with `normalize=False`, so no shift is applied.

    `redraw` records whether the owner should draw fresh features on every
    training forward; the module never redraws by itself, because q and k must
    share one draw. Call `redraw_()` (once per forward) to draw new features from
    the current torch generator.
    """

    MAX_EXPONENT = 30.0

    def __init__(self, head_dim: int, num_features: int, redraw: bool = True):
        super().__init__()
        self.head_dim = int(head_dim)
        self.num_features = int(num_features)
        self.redraw = bool(redraw)
        self.register_buffer("projection", torch.empty(self.num_features, self.head_dim))
        self.redraw_()

    @torch.no_grad()
    def redraw_(self) -> "Favor":
        """Draw new orthogonal random features in place (uses the global torch generator)."""
        d, m = self.head_dim, self.num_features
        blocks = []
        for _ in range(math.ceil(m / d) if d else 0):
            # d orthonormal directions, uniformly (Haar) distributed: QR of a
            # Gaussian matrix with the signs of R's diagonal moved into Q
            # (without that correction Q is not uniform and the estimate is biased).
            orthogonal, upper = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
            orthogonal = orthogonal * torch.sign(torch.diagonal(upper))
            blocks.append(orthogonal.T)
        directions = torch.cat(blocks, 0)[:m] if blocks else torch.zeros(m, d, dtype=torch.float64)
        norms = torch.randn(m, d, dtype=torch.float64).norm(dim=1, keepdim=True)
        self.projection.copy_((directions * norms).to(self.projection.dtype))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.head_dim ** -0.25
        w = self.projection.to(x.dtype)
        exponent = x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)
        exponent = exponent.clamp(max=self.MAX_EXPONENT)
        return torch.exp(exponent) / math.sqrt(self.num_features)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_features={self.num_features}, redraw={self.redraw}"


class T2R(nn.Module):
    """Learned feature map `relu(x W^T + b)` of T2R (Kasai et al. 2021, "Finetuning
    Pretrained Transformers into RNNs").

    Parameters `weight` `(num_features, head_dim)` and `bias` `(num_features,)`,
    initialised like `nn.Linear`.
    """

    def __init__(self, head_dim: int, num_features: int):
        super().__init__()
        self.head_dim = int(head_dim)
        self.num_features = int(num_features)
        self.weight = nn.Parameter(torch.empty(self.num_features, self.head_dim))
        self.bias = nn.Parameter(torch.empty(self.num_features))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.head_dim) if self.head_dim else 0.0
        self.weight.uniform_(-bound, bound)
        self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype)))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_features={self.num_features}"


_BY_NAME = {"identity": identity, "elu": elu1, "relu": relu}


def resolve(feature_map: Union[str, Callable[[torch.Tensor], torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the callable for `"identity"`, `"elu"`, `"relu"`, or a callable (returned as is)."""
    if isinstance(feature_map, str):
        try:
            return _BY_NAME[feature_map]
        except KeyError:
            raise ValueError(f"feature_map: unknown name {feature_map!r}; expected one of "
                             f"{sorted(_BY_NAME)} or a callable") from None
    if callable(feature_map):
        return feature_map
    raise TypeError(f"feature_map: expected a name or a callable, got {type(feature_map).__name__}")
