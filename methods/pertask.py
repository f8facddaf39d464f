"""PerTaskFT: the independent-model upper bound.

Each task trains a fresh LoRA adapter from the base model, alone. At evaluation the task identity
is an oracle: task j is scored with its own adapter, and a task not trained yet with the base model
(adapters off). Its diagonal R[j][j] is the single-task reference some FWT variants need.

Reference: no code; the PerTaskFT row of O-LoRA's Table 1 (one adapter per task, trained alone).
"""

from __future__ import annotations

from typing import Any

from harness_methods.base import Context
from harness_methods.growth import BranchGrowth, branch_name
from harness_methods.lora import train_only


class PerTaskFT(BranchGrowth):
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
        self.trained.append(ctx.tasks[stage].name)
        super()._grow(ctx, stage)

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

    def state_dict(self) -> dict[str, Any]:
        return {"trained": list(self.trained)}
