"""Float tolerances derived from the arithmetic instead of guessed.

A value computed in floating point by a chain of `ops` roundings differs from the exact value by at
most about ops * eps times the magnitude of the terms it combined (the standard forward error
bound of a sum or a dot product, Higham, "Accuracy and Stability of Numerical Algorithms", 3.1).
Two correct computations that round in another order (another CPU's vector width, FMA, the
blocking of its matrix kernels, or another thread count) differ by at most the sum of their two
bounds. So every bound here is

    SAFETY * ops * eps(dtype) * scale

where `scale` is the magnitude of what is compared (or of the inputs, where the exact value is
zero), `ops` the length of the longest chain of roundings that produced it, and SAFETY = 4 covers
both computations' bounds and the few roundings around the chain. A bound of this form holds on
any CPU; a real defect (a wrong sign, a missing projection, a term read at the wrong position)
changes a value by a fraction of its scale, orders of magnitude above it.
"""

from __future__ import annotations

import torch

SAFETY = 4.0


def eps(dtype: torch.dtype = torch.float32) -> float:
    return torch.finfo(dtype).eps


def bound(scale: float | torch.Tensor, ops: int, dtype: torch.dtype = torch.float32) -> float:
    """The largest rounding difference of a value of magnitude `scale` after `ops` roundings."""
    return SAFETY * ops * eps(dtype) * float(scale)


def magnitude(*tensors: torch.Tensor) -> float:
    """The largest absolute entry among `tensors` (the scale of a comparison of them)."""
    return max(float(t.detach().abs().max()) for t in tensors if t.numel())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, ops: int,
                 scale: float | None = None) -> None:
    """Entry-wise |actual - expected| <= bound(scale, ops) in `expected`'s dtype; `scale` defaults
    to the larger magnitude of the two."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    limit = bound(magnitude(actual, expected) if scale is None else scale, ops, expected.dtype)
    error = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
    assert error <= limit, f"max |difference| {error:.3g} > bound {limit:.3g}"


def assert_small(value: torch.Tensor, *, ops: int, scale: float,
                 dtype: torch.dtype = torch.float32) -> None:
    """A value that is zero in exact arithmetic: every entry within the rounding of its inputs."""
    value = torch.as_tensor(value)
    limit = bound(scale, ops, dtype)
    error = float(value.detach().double().abs().max()) if value.numel() else 0.0
    assert error <= limit, f"max |value| {error:.3g} > bound {limit:.3g}"
