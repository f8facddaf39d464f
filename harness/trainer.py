"""The one training loop every method runs; methods act only through their hooks."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from harness.textio import Batcher
from methods.base import Context, Method


@dataclass
class FitResult:
    steps: int
    examples: int
    mean_loss: float
    last_loss: float
    seconds: float


def fit(ctx: Context, method: Method, batcher: Batcher, *, batch_size: int, grad_accum: int,
        epochs: int, max_grad_norm: float, seed: int, progress: bool = True,
        desc: str = "train") -> FitResult:
    """Train one stage: AdamW (or the method's optimizer), constant LR, gradient accumulation.

    Each optimizer step consumes `grad_accum` micro-batches of `batch_size`; the data order is
    shuffled every epoch by a generator seeded from `seed`, so a stage is reproducible on its own
    (which is what lets a run resume at a stage boundary with the same result).
    """
    model = ctx.model
    model.train()
    dataset = method.training_data(ctx)
    sources, targets = list(dataset["source"]), list(dataset["target"])
    params = method.trainable_parameters(ctx)
    if not params:
        raise RuntimeError(f"method {method.name!r} left no trainable parameters at stage {ctx.stage}")
    optimizer = method.make_optimizer(ctx, params)
    generator = torch.Generator().manual_seed(seed)
    per_step = batch_size * grad_accum
    steps_per_epoch = -(-len(sources) // per_step)  # the last step may be smaller, as in HF Trainer
    total_steps = steps_per_epoch * epochs
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=total_steps, desc=desc, leave=False, disable=not progress, unit="step")
    for _ in range(epochs):
        perm = torch.randperm(len(sources), generator=generator).tolist()
        for step in range(steps_per_epoch):
            ids = perm[step * per_step:(step + 1) * per_step]
            micro = [batcher.train_batch([sources[i] for i in ids[k:k + batch_size]],
                                         [targets[i] for i in ids[k:k + batch_size]])
                     for k in range(0, len(ids), batch_size)]

            def closure(micro=micro) -> torch.Tensor:
                total = torch.zeros(())
                for batch in micro:
                    outputs = model(**batch)
                    loss = outputs.loss
                    extra = method.penalty(ctx, batch, outputs)
                    if extra is not None:
                        loss = loss + extra
                    (loss / len(micro)).backward()
                    total += loss.detach()
                return total / len(micro)

            loss = method.step(ctx, closure)
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
            bar.update(1)
            if len(losses) % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}")
    bar.close()
    return FitResult(steps=len(losses), examples=len(sources) * epochs,
                     mean_loss=sum(losses) / max(1, len(losses)),
                     last_loss=losses[-1] if losses else float("nan"),
                     seconds=time.perf_counter() - start)
