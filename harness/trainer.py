"""The one training loop every method runs; methods act only through their hooks."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import torch
from tqdm.auto import tqdm

from harness import faults
from harness.checkpoints import Preemption, StepCheckpoints
from harness.efficiency import FlopMeter, batch_shape, computation_key, counting
from harness.grad_norm import clip_
from harness.distributed import SINGLE, World
from harness.textio import Batcher
from harness_methods.base import Context, Method, penalty_terms


@dataclass
class FitResult:
    steps: int
    examples: int
    mean_loss: float
    last_loss: float
    seconds: float
    flops: float = 0.0  # the steps' FLOPs (harness.efficiency), those before a resume excluded


class LocalStep:
    """Plain PyTorch: the mean of the micro-batch losses, clipping (harness.grad_norm: the norm
    any split of the gradient gives), the optimizer's step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 params: list[torch.nn.Parameter], max_grad_norm: float, autocast: bool = False,
                 compile_backend: str = ""):
        self.model, self.optimizer, self.params = model, optimizer, params
        self.max_grad_norm = max_grad_norm
        self.autocast = autocast  # bf16 autocast on GPU when the profile asks
        self.grad_norm: torch.Tensor | None = None
        # `train.compile`: the training forward (and so its backward) compiled by torch.compile;
        # the model itself stays as it is (its state dict, hooks and evaluation untouched).
        self.call = torch.compile(model, backend=compile_backend) if compile_backend else model

    def forward(self, batch: dict):
        # A counted step runs the plain forward: the first call of a compiled one under the FLOP
        # counter's dispatch mode would leave it uncompiled for good.
        call = self.model if counting() else self.call
        if self.autocast:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return call(**batch)
        return call(**batch)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def state_dict(self) -> dict:  # for a step checkpoint
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def step(self) -> None:
        if self.max_grad_norm:  # the norm before clipping, the same to the bit as DeepSpeed's
            self.grad_norm = clip_([p.grad for p in self.params if p.grad is not None],
                                   self.max_grad_norm)
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


@dataclass(frozen=True)
class FitSettings:
    """How one stage trains (from the profile, the run's seed and the world)."""

    batch_size: int                  # per micro-batch, per rank
    grad_accum: int = 1
    epochs: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0                    # seeds the stage's shuffles
    group_by_length: bool = False
    padding_free: bool = False       # causal models: each micro-batch's rows packed into one
    compile_backend: str = ""        # torch.compile's backend for the training forward; "": none
    autocast: bool = False           # bf16 autocast (the plain loop on a GPU)
    progress: bool = True
    desc: str = "train"
    world: World = SINGLE
    engine_config: dict | None = None  # DeepSpeed's; None: the plain loop
    on_step: Callable[[int, dict[str, float]], None] | None = None  # (step, values): tracking
    checkpoints: StepCheckpoints | None = None  # step checkpoints (and preemption signals); None: none

    @classmethod
    def of_profile(cls, profile, **rest) -> "FitSettings":
        return cls(batch_size=profile.batch_size, grad_accum=profile.grad_accum,
                   epochs=profile.epochs, max_grad_norm=profile.max_grad_norm,
                   group_by_length=profile.group_by_length,
                   padding_free=profile.padding_free, compile_backend=profile.compile, **rest)


def rank_micro_batches(step: list[int], batch_size: int, grad_accum: int, rank: int = 0,
                       ranks: int = 1, engine: bool = False) -> list[tuple[list[int], float | None]]:
    """This rank's micro-batches of one optimizer step (example ids), each with its loss weight.

    The step is cut into micro-batches of `batch_size`; rank r takes micro-batches r*grad_accum to
    (r+1)*grad_accum - 1. The plain loop (one rank) takes them all with weight None: divide by their
    count. The engine divides every loss by grad_accum and averages over ranks, so each gets
    ranks * grad_accum / (micro-batches in the step): the step's gradient is then the mean over the
    micro-batches that exist, the last, smaller step of an epoch included; a rank left without one
    runs a zero-weighted pass on the step's first, so that every rank joins the same collectives.
    A method's extra pass on other examples (A-GEM's memory batch) may hold more micro-batches
    than the ranks' grad_accum each: every rank then takes the same larger number.
    """
    chunks = [step[k:k + batch_size] for k in range(0, len(step), batch_size)]
    if not engine:
        return [(chunk, None) for chunk in chunks]
    weight = ranks * grad_accum / len(chunks)
    per_rank = max(grad_accum, -(-len(chunks) // ranks))
    mine = chunks[rank * per_rank:(rank + 1) * per_rank]
    return [(chunk, weight) for chunk in mine] + [(chunks[0], 0.0)] * (per_rank - len(mine))


def _micro_batches(batcher: Batcher, rows: list[dict], s: FitSettings
                   ) -> list[tuple[dict, float | None, list[dict]]]:
    """This rank's micro-batches of one step's training rows (each with `source` and `target`):
    the model batch, its loss weight, and the rows it holds."""
    micro = []
    for chunk, w in rank_micro_batches(list(range(len(rows))), s.batch_size, s.grad_accum,
                                       s.world.rank, s.world.size, s.engine_config is not None):
        mine = [rows[i] for i in chunk]
        micro.append((batcher.train_batch([r["source"] for r in mine],
                                          [r["target"] for r in mine], s.padding_free), w, mine))
    return micro


def _stepper(ctx: Context, method: Method, settings: FitSettings, params):
    optimizer = method.make_optimizer(ctx, params)
    if settings.engine_config is not None:
        from harness.distributed import EngineStep

        return EngineStep(ctx.model, optimizer, settings.engine_config, settings.world)
    return LocalStep(ctx.model, optimizer, params, settings.max_grad_norm, settings.autocast,
                     settings.compile_backend)


def _closure(ctx: Context, method: Method, stepper, micro: list[tuple[dict, float | None, list]],
             parts: dict[str, torch.Tensor] | None = None,
             batches_of: Callable[[list[dict]], list] | None = None):
    """Forward and backward over one step's micro-batches (task loss + the method's penalty
    terms); returns their mean loss, kept on the device (reading it would make the host wait).
    With `parts`, also leaves there the mean task loss and the mean of each penalty term.
    `closure(examples)` runs the same over other (source, target) pairs instead, cut into
    micro-batches as a step's are (`batches_of`), for a method's extra pass (parts untouched).
    Before each forward, `ctx.batch_rows` is set to the rows of the micro-batch."""

    def closure(examples: list[tuple[str, str]] | None = None) -> torch.Tensor:
        own = examples is None
        batches = micro if own else batches_of([{"source": s, "target": t} for s, t in examples])
        track = parts if own else None
        total, real = torch.zeros((), device=ctx.device), 0
        if track is not None:
            track.clear()
        for k, (batch, w, rows) in enumerate(batches):
            ctx.batch_rows = rows
            outputs = stepper.forward(batch)
            terms = penalty_terms(method.penalty(ctx, batch, outputs))
            loss = outputs.loss
            for term in terms.values():
                loss = loss + term
            stepper.backward(loss / len(batches) if w is None else loss * w,
                             last=k == len(batches) - 1)
            if w != 0.0:
                total += loss.detach().float()
                real += 1
                if track is not None:
                    for name, value in {"task_loss": outputs.loss,
                                        **{f"penalty/{n}": t for n, t in terms.items()}}.items():
                        track[name] = track.get(name, 0.0) + value.detach().float()
        if track is not None:
            for name in track:
                track[name] = track[name] / max(1, real)
        return total / max(1, real)

    return closure


def _step_values(loss: torch.Tensor, parts: dict[str, torch.Tensor], stepper, examples: int,
                 seconds: float) -> dict[str, float]:
    """What a tracker shows of one optimizer step (reading them waits for the device)."""
    optimizer = getattr(stepper, "optimizer", None) or stepper.engine.optimizer
    values = {"loss": float(loss), **{name: float(v) for name, v in parts.items()},
              "lr": optimizer.param_groups[0]["lr"],
              "examples_per_second": examples / max(seconds, 1e-9)}
    if getattr(stepper, "grad_norm", None) is not None:
        values["grad_norm"] = float(stepper.grad_norm)
    return values


def fit(ctx: Context, method: Method, batcher: Batcher, settings: FitSettings) -> FitResult:
    """Train one stage: AdamW (or the method's optimizer), constant LR, gradient accumulation.

    Each optimizer step consumes `grad_accum` micro-batches of `batch_size` on each of the
    `world.size` ranks (`rank_micro_batches`); the data order is shuffled every epoch by a
    generator seeded from `seed`, so a stage is reproducible on its own (which is what lets a run
    resume at a stage boundary with the same result). The gradient of a step is the mean over its
    micro-batches of their mean losses, so W ranks compute exactly what one process with
    accumulation W * grad_accum computes. With `checkpoints`, the stage goes on from its latest
    step checkpoint and writes them (harness.checkpoints: every N steps, and on preemption)."""
    s, world = settings, settings.world
    if getattr(ctx.model, "reads_whole_prompt", False):  # it needs each row's prompt on its own
        s = replace(s, padding_free=False)
    ctx.model.train()
    rows = method.training_data(ctx).to_list()
    params = _trainable(ctx, method)
    stepper = _stepper(ctx, method, s, params)
    steps, total_steps = _stage_steps(rows, batcher, s)
    losses = _restore(s.checkpoints, method, params, stepper)
    done = len(losses)
    meter = FlopMeter(computation_key(method.name, ctx.model, params))
    start = tick = time.perf_counter()
    bar = tqdm(total=total_steps, initial=done, desc=s.desc, leave=False,
               disable=not s.progress or not world.main, unit="step")
    try:
        with Preemption(enabled=s.checkpoints is not None) as preemption:
            for position, ids in enumerate(steps, start=1):
                if position <= done:  # trained before the step checkpoint
                    continue
                loss, parts = _train_step(ctx, method, batcher, stepper, [rows[i] for i in ids], s,
                                          meter)
                losses.append(loss)
                if s.on_step is not None:
                    now = time.perf_counter()
                    s.on_step(len(losses), _step_values(loss, parts, stepper, len(ids), now - tick))
                    tick = now
                bar.update(1)
                if len(losses) % 10 == 0 and not bar.disable:
                    bar.set_postfix(loss=f"{float(sum(losses[-10:])) / 10:.3f}")
                faults.point("train_step")
                _checkpoint(s.checkpoints, preemption, world, method, params, stepper, losses)
    finally:
        stepper.close()
        bar.close()
    values = torch.stack(losses).float().cpu().tolist() if losses else []
    return FitResult(steps=len(values), examples=len(rows) * s.epochs,
                     mean_loss=sum(values) / max(1, len(values)),
                     last_loss=values[-1] if values else float("nan"),
                     seconds=time.perf_counter() - start, flops=meter.total)


def _trainable(ctx: Context, method: Method) -> list[torch.nn.Parameter]:
    """The parameters the method trains at this stage, their gradients emptied (`step` starts
    from none, whatever a hook before it left)."""
    params = method.trainable_parameters(ctx)
    if not params:
        raise RuntimeError(f"method {method.name!r} left no trainable parameters at stage {ctx.stage}")
    for p in params:
        p.grad = None
    return params


def _stage_steps(rows: list[dict], batcher: Batcher, s: FitSettings):
    """Every optimizer step of the stage (example ids), epoch after epoch, and how many there
    are. Each epoch's shuffle is drawn from the stage's generator when the epoch starts."""
    generator = torch.Generator().manual_seed(s.seed)
    per_step = s.batch_size * s.grad_accum * s.world.size
    lengths = batcher.source_lengths([r["source"] for r in rows]) if s.group_by_length else None

    def steps():
        for _ in range(s.epochs):
            perm = torch.randperm(len(rows), generator=generator).tolist()
            yield from epoch_steps(perm, per_step, lengths, generator)

    return steps(), -(-len(rows) // per_step) * s.epochs  # an epoch's last step may be smaller


def _train_step(ctx: Context, method: Method, batcher: Batcher, stepper, rows: list[dict],
                s: FitSettings, meter: FlopMeter) -> tuple[torch.Tensor, dict | None]:
    """One optimizer step on `rows`: its loss (on the device) and, when tracked, its parts;
    `meter` counts its FLOPs."""
    micro = _micro_batches(batcher, rows, s)
    parts = {} if s.on_step is not None else None
    closure = _closure(ctx, method, stepper, micro, parts, partial(_micro_batches, batcher, s=s))
    with meter.step(batch_shape(batch for batch, _, _ in micro)):
        loss = method.step(ctx, closure).detach()
    match_layouts(stepper.params)
    stepper.step()
    method.after_step(ctx)
    return loss, parts


def match_layouts(params: list[torch.nn.Parameter]) -> None:
    """Give each gradient its parameter's memory layout. Autograd writes them so; a method that
    writes `.grad` itself may not (a row-major gradient for a column-major slice of an SVD), and a
    fused optimizer pairs a parameter's entries with its gradient's by memory order."""
    for p in params:
        if p.grad is not None and p.grad.stride() != p.stride():
            p.grad = torch.empty_like(p).copy_(p.grad)


def _restore(checkpoints: StepCheckpoints | None, method: Method, params, stepper) -> list:
    """The losses of the steps a step checkpoint holds (none without one), its state loaded."""
    if checkpoints is None:
        return []
    latest = checkpoints.world.broadcast(checkpoints.resume_point())  # rank 0's: it writes them
    if latest is None:
        return []
    fit_state, losses = checkpoints.restore(latest, params, stepper.load_state_dict)
    method.load_fit_state(fit_state)
    return losses


def _checkpoint(checkpoints: StepCheckpoints | None, preemption: Preemption, world: World,
                method: Method, params, stepper, losses: list) -> None:
    """At a step boundary: write a step checkpoint when one is due or a preemption signal came
    (on any rank: they all stop at the same step), then let the signal take its course."""
    if checkpoints is None:
        return
    stop = world.any(preemption.received is not None)
    if stop or checkpoints.due(len(losses)):
        checkpoints.save(len(losses), params, stepper.state_dict(), method.fit_state(), losses)
    if stop:
        preemption.received = preemption.received or signal.SIGTERM
        preemption.deliver()
