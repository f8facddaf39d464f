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
    error = float((actual.detach().double() - expected.detach().double()).abs().max()) \
        if actual.numel() else 0.0
    assert error <= limit, f"max |difference| {error:.3g} > bound {limit:.3g}"


def assert_small(value: torch.Tensor, *, ops: int, scale: float,
                 dtype: torch.dtype = torch.float32) -> None:
    """A value that is zero in exact arithmetic: every entry within the rounding of its inputs."""
    value = torch.as_tensor(value)
    limit = bound(scale, ops, dtype)
    error = float(value.detach().double().abs().max()) if value.numel() else 0.0
    assert error <= limit, f"max |value| {error:.3g} > bound {limit:.3g}"


def network_ops(config, tokens: int, backward: bool = False) -> int:
    """The longest chain of roundings through a transformer (a T5 or LLaMA `config`) over `tokens`
    positions: per layer eight hidden-size sums (norms, projections; a decoder's cross-attention
    included), the head-size scores, two softmaxes and weighted sums over the positions, and the
    feed-forward's intermediate-size sum; then the head's hidden-size sum and the softmax over the
    vocabulary. `backward`: a gradient retraces the chain and sums a weight's terms over the
    positions."""
    def get(*names):
        return next(getattr(config, n) for n in names if getattr(config, n, None))

    hidden = get("d_model", "hidden_size")
    layers = get("num_layers", "num_hidden_layers") + (getattr(config, "num_decoder_layers", 0) or 0)
    head = getattr(config, "d_kv", None) or getattr(config, "head_dim", None) \
        or hidden // config.num_attention_heads
    per_layer = 8 * hidden + get("d_ff", "intermediate_size") + head + 4 * tokens
    forward = layers * per_layer + hidden + config.vocab_size
    return 2 * forward + tokens if backward else forward
