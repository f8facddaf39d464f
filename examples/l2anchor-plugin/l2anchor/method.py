"""L2Anchor: one LoRA adapter through all tasks, pulled toward its values at the end of the
previous stage by an L2 penalty (lambda / 2) * ||theta - theta_prev||^2.

Written by `harness new-method l2anchor`; edit the hooks to make it your method. Every hook, its
order and its contract: docs/writing-a-method.md of cl-harness.
"""

from __future__ import annotations

from typing import Any

import torch

from harness_methods.base import Context, Method
from harness_methods.deltas import StageChange
from harness_methods.lora import add_branch, lora_config


class L2Anchor(Method):
    name = "l2anchor"

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)  # checks lr (required) and weight_decay
        # Read and check every setting here: a bad value then stops the run before it starts.
        self.lam = self.number("lambda", 1.0, low=0)
        self.params: dict[str, torch.nn.Parameter] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.change: StageChange | None = None

    def check(self, ctx: Context) -> None:
        lora_config(ctx, self.config)  # LoRA targets this backbone lacks: refused before any file

    def setup(self, ctx: Context) -> None:
        add_branch(ctx, "l2anchor", self.config)  # a peft LoRA adapter shaped by the profile

    def before_task(self, ctx: Context) -> None:
        self.params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
        self.change = StageChange(ctx, self.config, branch="l2anchor")  # the adapter as it starts

    def penalty(self, ctx: Context, batch: dict, outputs) -> torch.Tensor | None:
        if not self.anchor:
            return None
        return 0.5 * self.lam * sum(((p - self.anchor[n]) ** 2).sum() for n, p in self.params.items())

    # A method that changes the step itself overrides `step(ctx, closure)`: `closure()` runs the
    # step's forward and backward, `closure(examples)` the same on other (source, target) pairs;
    # whatever `.grad` holds when it returns is what is applied.

    def after_task(self, ctx: Context) -> None:
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}

    def task_deltas(self, ctx: Context) -> dict[str, torch.Tensor]:  # for the parameter metrics
        return self.change.delta(ctx)

    def stage_metrics(self, ctx: Context) -> dict[str, float]:  # in each stage's metrics.json
        return {"anchored_tensors": len(self.anchor)}

    def state_dict(self) -> dict[str, Any]:  # what a resumed run needs: flat tensors, JSON values
        return dict(self.anchor)

    def load_state_dict(self, state: dict[str, Any], ctx: Context, completed_stages: int) -> None:
        self.anchor = {n: t for n, t in state.items() if isinstance(t, torch.Tensor)}
