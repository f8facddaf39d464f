"""The one training loop every method runs; methods act only through their hooks."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from harness import faults
from harness.distributed import SINGLE, World
from harness.textio import Batcher
from methods.base import Context, Method


@dataclass
class FitResult:
    steps: int
    examples: int
    mean_loss: float
    last_loss: float
    seconds: float


class LocalStep:
    """Plain PyTorch: the mean of the micro-batch losses, clipping, the optimizer's step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 params: list[torch.nn.Parameter], max_grad_norm: float, autocast: bool = False):
        self.model, self.optimizer, self.params = model, optimizer, params
        self.max_grad_norm = max_grad_norm
        self.autocast = autocast  # bf16 autocast on GPU when the profile asks

    def forward(self, batch: dict):
        if self.autocast:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.model(**batch)
        return self.model(**batch)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        pass


def epoch_steps(perm: list[int], per_step: int, lengths: list[int] | None = None,
                generator: torch.Generator | None = None, group: int = 8) -> list[list[int]]:
    """One epoch's optimizer steps: consecutive slices of `per_step` examples of the shuffled
    `perm` (the last may be smaller). With `lengths`, examples are grouped by length as HF's
    `group_by_length` does: every `group` steps' worth of the shuffle is sorted by length before it
    is cut into steps, so a batch pads little, and the steps are then shuffled (by `generator`)
    so that long and short batches alternate at random instead of running longest first."""
    if lengths is None:
        return [perm[k:k + per_step] for k in range(0, len(perm), per_step)]
    steps = []
    for g in range(0, len(perm), per_step * group):
        part = sorted(perm[g:g + per_step * group], key=lambda i: -lengths[i])
        steps += [part[k:k + per_step] for k in range(0, len(part), per_step)]
    return [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]


def fit(ctx: Context, method: Method, batcher: Batcher, *, batch_size: int, grad_accum: int,
        epochs: int, max_grad_norm: float, seed: int, progress: bool = True,
        desc: str = "train", world: World = SINGLE,
        engine_config: dict | None = None) -> FitResult:
    """Train one stage: AdamW (or the method's optimizer), constant LR, gradient accumulation.

    Each optimizer step consumes `grad_accum` micro-batches of `batch_size` on each of the
    `world.size` ranks; the data order is shuffled every epoch by a generator seeded from `seed`,
    so a stage is reproducible on its own (which is what lets a run resume at a stage boundary with
    the same result). The gradient of a step is the mean over its micro-batches of their mean
    losses. Rank r takes micro-batches r*grad_accum ... of each global step, so W ranks compute
    exactly what one process with accumulation W*grad_accum computes, the last (smaller) step of
    an epoch included: there each micro-batch's loss is weighted so that the engine's averaging
    over ranks and accumulation gives the mean over the micro-batches that exist, and a rank left
    without one runs a zero-weighted pass so that every rank joins the same collectives.
    """
    model = ctx.model
    model.train()
    dataset = method.training_data(ctx)
    sources, targets = list(dataset["source"]), list(dataset["target"])
    params = method.trainable_parameters(ctx)
    if not params:
        raise RuntimeError(f"method {method.name!r} left no trainable parameters at stage {ctx.stage}")
    optimizer = method.make_optimizer(ctx, params)
    if engine_config is not None:
        from harness.distributed import EngineStep

        stepper = EngineStep(model, optimizer, engine_config)
    else:
        stepper = LocalStep(model, optimizer, params, max_grad_norm,
                            autocast=ctx.profile.bf16 and ctx.device.type == "cuda")
    generator = torch.Generator().manual_seed(seed)
    per_step = batch_size * grad_accum * world.size
    lengths = batcher.source_lengths(sources) if ctx.profile.group_by_length else None
    steps_per_epoch = -(-len(sources) // per_step)  # the last step may be smaller, as in HF Trainer
    total_steps = steps_per_epoch * epochs
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=total_steps, desc=desc, leave=False, disable=not progress or not world.main,
               unit="step")
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(sources), generator=generator).tolist()
            for ids in epoch_steps(perm, per_step, lengths, generator):
                chunks = [ids[k:k + batch_size] for k in range(0, len(ids), batch_size)]
                if engine_config is None:
                    weighted = [(chunk, None) for chunk in chunks]  # None: divide by their count
                else:  # the engine divides by grad_accum and averages over ranks
                    weight = world.size * grad_accum / len(chunks)
                    mine = chunks[world.rank * grad_accum:(world.rank + 1) * grad_accum]
                    weighted = [(chunk, weight) for chunk in mine]
                    weighted += [(chunks[0], 0.0)] * (grad_accum - len(mine))
                micro = [(batcher.train_batch([sources[i] for i in chunk],
                                              [targets[i] for i in chunk]), w) for chunk, w in weighted]

                def closure(micro=micro) -> torch.Tensor:
                    # The loss stays on the device: reading it would make the host wait for the
                    # GPU every step.
                    total, real = torch.zeros((), device=ctx.device), 0
                    for k, (batch, w) in enumerate(micro):
                        outputs = stepper.forward(batch)
                        loss = outputs.loss
                        extra = method.penalty(ctx, batch, outputs)
                        if extra is not None:
                            loss = loss + extra
                        stepper.backward(loss / len(micro) if w is None else loss * w,
                                         last=k == len(micro) - 1)
                        if w != 0.0:
                            total += loss.detach().float()
                            real += 1
                    return total / max(1, real)

                loss = method.step(ctx, closure)
                stepper.step()
                losses.append(loss.detach())
                bar.update(1)
                if len(losses) % 10 == 0 and not bar.disable:
                    bar.set_postfix(loss=f"{float(sum(losses[-10:])) / 10:.3f}")
                faults.point("train_step")
    finally:
        stepper.close()
        bar.close()
    losses = torch.stack(losses).float().cpu().tolist() if losses else []
    return FitResult(steps=len(losses), examples=len(sources) * epochs,
                     mean_loss=sum(losses) / max(1, len(losses)),
                     last_loss=losses[-1] if losses else float("nan"),
                     seconds=time.perf_counter() - start)
