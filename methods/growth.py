"""What the growth methods share (IncLoRA, O-LoRA, N-LoRA, InfLoRA, GORP, PerTaskFT): a new peft
LoRA branch per stage, named for its stage, and the terms and per-stage coefficients several of
them put on it."""

from __future__ import annotations

from typing import Any

import torch

from harness_methods.base import Context, Method
from harness_methods.deltas import branch_factors
from harness_methods.lora import add_branch, lora_config


def branch_name(stage: int) -> str:
    return f"task{stage + 1}"


class BranchGrowth(Method):
    """A new LoRA branch (peft adapter `branch_name(stage)`) before every stage; a resumed run
    grows the completed stages' branches again before their weights are loaded. Subclasses say
    which branches act and train (`_activate`)."""

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.branches: list[str] = []

    def check(self, ctx: Context) -> None:
        lora_config(ctx, self.config)  # targets that match no module of this backbone

    def _activate(self, ctx: Context, name: str) -> None:
        raise NotImplementedError

    def _grow(self, ctx: Context, stage: int) -> None:
        name = branch_name(stage)
        add_branch(ctx, name, self.config)
        self.branches.append(name)
        self._activate(ctx, name)

    def before_task(self, ctx: Context) -> None:
        self._grow(ctx, ctx.stage)

    def task_deltas(self, ctx: Context) -> dict[str, torch.Tensor]:
        return branch_factors(ctx.model, branch_name(ctx.stage))

    def load_state_dict(self, state: dict[str, Any], ctx: Context, completed_stages: int) -> None:
        for stage in range(completed_stages):
            self._grow(ctx, stage)


def orthogonality_term(a_old: torch.Tensor | None, a_new: torch.Tensor, form: str) -> torch.Tensor:
    """Overlap of the new down-projection (r x d_in) with the stacked old ones ((t-1)r x d_in)."""
    if a_old is None or a_old.shape[0] == 0:
        return a_new.new_zeros(())
    overlap = a_old @ a_new.T
    return overlap.abs().sum() if form == "code_l1" else overlap.pow(2).sum()


def norm_term(params: list[torch.Tensor], form: str) -> torch.Tensor:
    if form == "code_norm":
        return sum(p.norm() for p in params)
    return sum(p.pow(2).sum() for p in params)


def stage_lambdas(config: dict, ctx: Context, names: tuple[str, ...]) -> list[float]:
    """The lambdas for this stage: the config's values, overridden by `per_task.<task>` when the
    run's order is one of `per_task_orders`."""
    override = {}
    if ctx.order in config.get("per_task_orders", []):
        override = config.get("per_task", {}).get(ctx.task.name, {})
    return [float(override.get(n, config.get(n, 0.0))) for n in names]
