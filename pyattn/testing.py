"""Tolerances for comparing kernels with the references, stated once.

Two rules, as flash-attention's tests use them:

* `assert_close`: absolute + relative tolerance by dtype, for results
  computed from inputs of that dtype against a float64 reference.
* `assert_close_relative`: the error of a kernel against the float64 reference
  may be at most `factor` times the error plain PyTorch makes in the same
  dtype (plus a small floor), so tolerances follow the problem's conditioning.
"""
from __future__ import annotations

from typing import Optional

import torch

# (atol, rtol) for outputs of a computation in `dtype` compared with a float64 reference
TOLERANCES = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (1.6e-2, 4e-2),
}


def tolerance(dtype: torch.dtype):
    return TOLERANCES[dtype]


def _finite_equal_masks(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    same = (torch.isnan(actual) == torch.isnan(expected)) & (torch.isinf(actual) == torch.isinf(expected))
    if not bool(same.all()):
        raise AssertionError(f"{name}: NaN/inf pattern differs from the reference")
    inf = torch.isinf(expected)
    if inf.any() and not torch.equal(actual[inf], expected[inf].to(actual.dtype)):
        raise AssertionError(f"{name}: infinities differ in sign")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: Optional[torch.dtype] = None, *,
                 name: str = "value", factor: float = 1.0) -> None:
    """`actual` (computed in `dtype`, default its own) matches `expected` within that dtype's tolerance."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    a, e = actual.detach().double(), expected.detach().double()
    _finite_equal_masks(a, e, name)
    finite = torch.isfinite(e)
    torch.testing.assert_close(a[finite], e[finite], atol=atol * factor, rtol=rtol * factor, msg=lambda m: f"{name}: {m}")


def assert_close_relative(actual: torch.Tensor, reference64: torch.Tensor, baseline: torch.Tensor, *,
                          name: str = "value", factor: float = 2.0, floor: Optional[float] = None) -> None:
    """max|actual - ref64| <= factor * max|baseline - ref64| + floor, where `baseline` is plain PyTorch in
    the kernel's dtype (floor defaults to the dtype's atol)."""
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    ref = reference64.detach().double()
    _finite_equal_masks(actual.detach().double(), ref, name)
    finite = torch.isfinite(ref)
    err = (actual.detach().double() - ref)[finite].abs().max().item() if finite.any() else 0.0
    base = (baseline.detach().double() - ref)[finite].abs().max().item() if finite.any() else 0.0
    bound = factor * base + (TOLERANCES[actual.dtype][0] if floor is None else floor)
    if not err <= bound:
        raise AssertionError(f"{name}: max error {err:.3e} > {factor} x baseline error {base:.3e} + floor")
