"""Gradient clipping whose norm does not depend on how the gradient is split.

Clipping scales a step's gradient by 1 / max(1, (||g|| + 1e-6) / max_norm). A float32 norm rounds
differently when the entries are summed in another grouping: per tensor and then over tensors in
one process (torch's `clip_grad_norm_`), per ZeRO partition and then over ranks under DeepSpeed.
That last-bit difference in the scale was the only thing that kept two data-parallel ranks from
training exactly what one process with the same global batch trains (without clipping the two are
bitwise equal: halving is exact and a two-rank all-reduce is one addition).

So the norm here is computed exactly: each entry's square is exact in float64 (a float32, bf16 or
fp16 significand squared fits in 53 bits); it is cut into two parts on a fixed-point grid set by the
largest square and the number of entries, each an integer below 2^52 / entries, so that every sum
of them, in any order, on any rank, is an integer below 2^53 and exact in float64. The squared norm
is then rounded once. Entries below the finer grid (2^-100 of the largest square for a million
entries) are dropped, the same way wherever they sit.

The single-process loop, DeepSpeed's ZeRO-0 clipping and ZeRO-1/2's partitioned norm all use it,
and the scale is applied with DeepSpeed's arithmetic (the same operations in the same order).
"""

from __future__ import annotations

import math
from typing import Any

import torch

BITS = 52  # every partial sum of the fixed-point parts is an integer below 2^53: exact


def _all_reduce(value: torch.Tensor, world: Any, op: str) -> torch.Tensor:
    """Across the ranks of `world` (harness.distributed.World, which uses this module, so it is
    not imported here); None: this process alone."""
    if world is not None and world.size > 1:
        import torch.distributed as dist

        dist.all_reduce(value, op=getattr(dist.ReduceOp, op))
    return value


# The CPU's work buffers, kept between steps: a fresh buffer of a few MB is returned to the kernel
# when freed and faulted in again at its next use, which cost more than the arithmetic on it (the
# embedded default's full fine-tuning: 3.5 ms a step with fresh buffers, 1.5 ms with these). A
# GPU's caching allocator already keeps its memory.
_work: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _buffers(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 buffers of `size` entries (kept on the CPU, grown as needed)."""
    if device.type != "cpu":
        return tuple(torch.empty(size, dtype=torch.float64, device=device) for _ in range(2))
    kept = _work.get(device)
    if kept is None or kept[0].numel() < size:
        kept = _work[device] = tuple(torch.empty(size, dtype=torch.float64) for _ in range(2))
    return kept[0][:size], kept[1][:size]


def _chunks(grads: list[torch.Tensor], size: int | None = None):
    """The entries of `grads` as flat float64 tensors of at most `size` entries (4M on the CPU,
    whose two kept buffers then hold 64 MB at most; 16M on a GPU), each with a scratch tensor of
    its size: a few large operations instead of several per tensor (any split gives the same
    norm)."""
    size = size or (1 << 22 if grads[0].device.type == "cpu" else 1 << 24)
    work, scratch = _buffers(min(size, sum(g.numel() for g in grads)), grads[0].device)
    filled = 0
    for g in grads:
        for piece in g.detach().reshape(-1).split(size):
            if filled + piece.numel() > size:
                yield work[:filled], scratch[:filled]
                filled = 0
            work[filled:filled + piece.numel()].copy_(piece)
            filled += piece.numel()
    if filled:
        yield work[:filled], scratch[:filled]


def global_norm(grads: list[torch.Tensor], world: Any = None) -> torch.Tensor:
    """The Euclidean norm of all entries of `grads` on all ranks of `world` (each entry held by
    one rank; None: this process) as a float32 tensor, bitwise the same however the entries are
    split into tensors and ranks."""
    grads = [g for g in grads if g.numel()]
    device = grads[0].device if grads else torch.device("cpu")
    largest = torch.stack([m for g in grads for m in torch.aminmax(g.detach())]).abs().max() \
        .double() ** 2 if grads else torch.zeros((), dtype=torch.float64, device=device)
    count = torch.tensor(sum(g.numel() for g in grads), dtype=torch.float64, device=device)
    largest = float(_all_reduce(largest, world, "MAX"))
    count = int(_all_reduce(count, world, "SUM"))
    if largest == 0.0 or not math.isfinite(largest):
        return torch.tensor(math.sqrt(largest), dtype=torch.float32, device=device)
    # Each square, times 2^coarse, is below 2^(BITS - spare): `count` of them sum below 2^BITS.
    spare = max(1, (count - 1).bit_length())
    coarse = BITS - spare - math.frexp(largest)[1]
    fine = BITS - spare  # the fraction the coarse part leaves, on a grid of 2^-fine
    parts = torch.zeros(2, dtype=torch.float64, device=device)
    for x, whole in _chunks(grads):  # scaling by a power of two, floor and fraction are exact
        x.square_().mul_(2.0 ** coarse)
        torch.floor(x, out=whole)
        parts += torch.stack([whole.sum(), x.sub_(whole).mul_(2.0 ** fine).floor_().sum()])
    coarse_sum, fine_sum = (float(v) for v in _all_reduce(parts, world, "SUM"))
    squared = math.ldexp(coarse_sum, -coarse) + math.ldexp(fine_sum, -coarse - fine)
    return torch.tensor(math.sqrt(squared), dtype=torch.float32, device=device)


def clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor the gradient is multiplied by: DeepSpeed's formula and operations (for loss
    scale 1), 1 / max(1, (norm + 1e-6) / max_norm)."""
    return 1.0 / torch.clamp((norm + 1e-6) / max_norm, min=1.0)


def clip_(grads: list[torch.Tensor], max_norm: float, world: Any = None
          ) -> torch.Tensor:
    """Clip `grads` in place to global norm `max_norm`; returns the norm before clipping."""
    norm = global_norm(grads, world)
    if grads:
        torch._foreach_mul_(grads, clip_scale(norm, max_norm))
    return norm
