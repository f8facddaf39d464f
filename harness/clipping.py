"""Gradient clipping whose norm does not depend on how the gradient is split.

Clipping scales a step's gradient by 1 / max(1, (||g|| + 1e-6) / max_norm). A float32 norm rounds
differently when the entries are summed in another grouping: per tensor and then over tensors in
one process (torch's `clip_grad_norm_`), per ZeRO partition and then over ranks under DeepSpeed.
That last-bit difference in the scale was the only thing that kept two data-parallel ranks from
training exactly what one process with the same global batch trains (without clipping the two are
bitwise equal: halving is exact and a two-rank all-reduce is one addition).

So the norm here is computed exactly, in integers: each entry's square is exact in float64 (a
float32, bf16 or fp16 significand squared fits in 53 bits); it is cut into two fixed-point int64
parts on a grid fixed by the largest square and the number of entries, and integer sums are the
same in any order and across ranks. The squared norm is then rounded once. Entries below the finer
grid (about 2^-120 of the largest square) are dropped, the same way wherever they sit.

The single-process loop, DeepSpeed's ZeRO-0 clipping and ZeRO-1/2's partitioned norm all use it,
and the scale is applied with DeepSpeed's arithmetic (the same operations in the same order).
"""

from __future__ import annotations

import math

import torch

from harness.distributed import SINGLE, World

BITS = 62  # int64 sums of the fixed-point parts stay below 2^62 (no overflow)


def _all_reduce(value: torch.Tensor, world: World, op: str) -> torch.Tensor:
    if world.size > 1:
        import torch.distributed as dist

        dist.all_reduce(value, op=getattr(dist.ReduceOp, op))
    return value


def global_norm(grads: list[torch.Tensor], world: World = SINGLE) -> torch.Tensor:
    """The Euclidean norm of all entries of `grads` on all ranks (each entry held by one rank),
    as a float32 tensor, bitwise the same however the entries are split into tensors and ranks."""
    device = grads[0].device if grads else torch.device("cpu")
    largest = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for g in grads:
        if g.numel():
            largest = torch.maximum(largest, g.detach().abs().max().double() ** 2)
            count += g.numel()
    largest, count = float(_all_reduce(largest, world, "MAX")), int(_all_reduce(count, world, "SUM"))
    if largest == 0.0 or not math.isfinite(largest):
        return torch.tensor(math.sqrt(largest), dtype=torch.float32, device=device)
    # Each square, times 2^coarse, is below 2^(BITS - spare): `count` of them sum below 2^BITS.
    spare = max(1, (count - 1).bit_length())
    coarse = BITS - spare - math.frexp(largest)[1]
    fine = BITS - spare  # the fraction left by the coarse part, on a grid of 2^-fine
    parts = torch.zeros(2, dtype=torch.int64, device=device)
    for g in grads:  # scaling by a power of two, floor and the fraction are all exact
        scaled = g.detach().double() ** 2 * 2.0 ** coarse
        whole = scaled.floor()
        parts[0] += whole.to(torch.int64).sum()
        parts[1] += ((scaled - whole) * 2.0 ** fine).floor().to(torch.int64).sum()
    coarse_sum, fine_sum = (int(v) for v in _all_reduce(parts, world, "SUM"))
    squared = math.ldexp(coarse_sum, -coarse) + math.ldexp(fine_sum, -coarse - fine)
    return torch.tensor(math.sqrt(squared), dtype=torch.float32, device=device)


def clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor the gradient is multiplied by: DeepSpeed's formula and operations (for loss
    scale 1), 1 / max(1, (norm + 1e-6) / max_norm)."""
    return 1.0 / torch.clamp((norm + 1e-6) / max_norm, min=1.0)


def clip_(grads: list[torch.Tensor], max_norm: float, world: World = SINGLE) -> torch.Tensor:
    """Clip `grads` in place to global norm `max_norm`; returns the norm before clipping."""
    norm = global_norm(grads, world)
    scale = clip_scale(norm, max_norm)
    for g in grads:
        g.mul_(scale)
    return norm
