"""A-GEM: averaged gradient episodic memory (Chaudhry et al., ICLR 2019).

Reference: facebookresearch/agem, model/model.py, the A-GEM branch of the training step.

An episodic memory keeps examples of the earlier tasks (methods.memory: label-stratified, seeded,
`memory_fraction` of each task's training set). Every optimizer step, after the gradient g of the
step's batch, a reference gradient g_ref is taken on a batch of `memory_batch` examples drawn at
random from the whole memory; where the two conflict, g is projected:

    g~ = g - (g . g_ref / g_ref . g_ref) g_ref    if g . g_ref < 0,    else g~ = g,

with g and g_ref flattened over every trainable tensor into one vector (as the reference, not per
layer); so that after it g~ . g_ref >= 0. The first task has no memory and trains plainly.
Base: one LoRA adapter (`base = "lora"`) or full fine-tuning (`base = "full"`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from harness_methods.base import Context, stage_seed
from harness_methods.memory import EpisodicMemory, MemoryHooks
from harness_methods.sequential import Sequential


def flat_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """a . b over every tensor, as one flattened vector."""
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def agem_project(grad: list[torch.Tensor], ref: list[torch.Tensor]) -> list[torch.Tensor]:
    """The A-GEM update direction: `grad` unchanged unless it points against `ref` (a negative dot
    product: an exactly zero one keeps it), else `grad` less its component along `ref`."""
    dot = flat_dot(grad, ref)
    if not dot < 0:
        return grad
    scale = dot / flat_dot(ref, ref)
    return [g - (scale * r.double()).to(g.dtype) for g, r in zip(grad, ref)]


class AGEM(MemoryHooks, Sequential):
    name = "agem"
    paper_name = "A-GEM"
    table_rank = 5.1
    max_zero_stage = 0  # reads the whole gradient between its two passes
    search_space = {"memory_fraction": (0.005, 0.2)}

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        per_task = (self.number("memory_per_task", integer=True, low=1)
                    if "memory_per_task" in self.config else None)
        self.memory = EpisodicMemory(per_task, self.number("memory_fraction", 0.02, above=0, high=1))
        self.memory_batch = self.number("memory_batch", integer=True, low=1)
        self.generator = torch.Generator()
        self.params: list[torch.nn.Parameter] = []
        self.projected = 0  # steps of this stage whose gradient was projected

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        self.generator = torch.Generator().manual_seed(stage_seed(ctx, ctx.stage))
        self.projected = 0

    def trainable_parameters(self, ctx: Context) -> list[torch.nn.Parameter]:
        self.params = super().trainable_parameters(ctx)
        return self.params

    def memory_batch_of(self, stored: list[dict]) -> list[tuple[str, str]]:
        """This step's reference batch: `memory_batch` stored examples drawn without replacement
        (all of them if fewer), by the stage's seeded generator, the same on every rank."""
        drawn = torch.randperm(len(stored), generator=self.generator)[:self.memory_batch].tolist()
        return [(stored[i]["source"], stored[i]["target"]) for i in drawn]

    def step(self, ctx: Context, closure: Callable[..., torch.Tensor]) -> torch.Tensor:
        loss = closure()
        stored = self.memory.earlier(ctx)
        if not stored:
            return loss
        params = self.params
        grad = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None
        closure(self.memory_batch_of(stored))
        ref = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        projected = agem_project(grad, ref)
        self.projected += projected is not grad
        for p, g in zip(params, projected):
            p.grad = g
        return loss

    def stage_metrics(self, ctx: Context) -> dict[str, float]:
        return {"projected_steps": self.projected}

    def fit_state(self) -> dict[str, Any]:  # the memory batches drawn so far moved it on
        return {"generator": self.generator.get_state(), "projected": self.projected}

    def load_fit_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.projected = state["projected"]
