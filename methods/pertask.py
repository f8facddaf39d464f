"""PerTaskFT: the independent-model upper bound.

Each task trains a fresh LoRA adapter from the base model, alone. At evaluation the task identity
is an oracle: task j is scored with its own adapter, and a task not trained yet with the base model
(adapters off). Its diagonal R[j][j] is the single-task reference some FWT variants need.

Reference: no code; the PerTaskFT row of O-LoRA's Table 1 (one adapter per task, trained alone).
"""

from __future__ import annotations

from typing import Any

import torch

from harness_methods.base import Context, Method
from harness_methods.deltas import branch_factors
from harness_methods.inclora import branch_name
from harness_methods.lora import add_branch, lora_config, train_only


class PerTaskFT(Method):
    name = "pertask"
    paper_name = "PerTaskFT"
    table_rank = 10

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.trained: list[str] = []  # task names, in stage order

    def _activate(self, ctx: Context, adapter: str) -> None:
        ctx.model.base_model.enable_adapter_layers()
        ctx.model.base_model.set_adapter(adapter)
        train_only(ctx.model, adapter)

    def _grow(self, ctx: Context, stage: int) -> None:
        add_branch(ctx, branch_name(stage), self.config)
        self.trained.append(ctx.tasks[stage].name)
        self._activate(ctx, branch_name(stage))

    def check(self, ctx: Context) -> None:
        lora_config(ctx, self.config)  # targets that match no module of this backbone

    def before_task(self, ctx: Context) -> None:
        self._grow(ctx, ctx.stage)

    def select_for_eval(self, ctx: Context, task) -> None:
        if not self.trained:
            return  # no adapter yet: the untrained model is the base model
        if task is None:  # back to training the current task's adapter
            self._activate(ctx, branch_name(len(self.trained) - 1))
        elif task.name in self.trained:
            self._activate(ctx, branch_name(self.trained.index(task.name)))
        else:
            ctx.model.base_model.disable_adapter_layers()

    def evaluates_as_before(self, ctx: Context, task) -> bool:
        # Only the adapter trained this stage is new: earlier ones are frozen, later tasks still
        # see the base model.
        return task.name != ctx.task.name

    def task_deltas(self, ctx: Context) -> dict[str, torch.Tensor]:
        return branch_factors(ctx.model, branch_name(ctx.stage))

    def state_dict(self) -> dict[str, Any]:
        return {"trained": list(self.trained)}

    def load_state_dict(self, state: dict[str, Any], ctx: Context, completed_stages: int) -> None:
        for stage in range(completed_stages):
            self._grow(ctx, stage)
