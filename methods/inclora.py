"""IncLoRA: a new LoRA branch per task; earlier branches and the backbone frozen; inference uses the
sum of all branches. It is O-LoRA with both regularisers at zero.

One known difference from the O-LoRA code, shared by every growth method here: peft gives each
branch its own LoRA dropout, so with dropout > 0 the frozen and the new branch see independent masks,
where the reference applies one mask x~ = dropout(x) to both. The expected output is the same; the
noise differs. The embedded default uses dropout 0, where the two coincide.

Reference: cmnfriend/O-LoRA at commit 2a2e620 (`src/uie_trainer_lora.py`,
`src/run_uie_lora.py`) run with `lamda_1 = lamda_2 = 0`.
"""

from __future__ import annotations

from typing import Any

import torch

from harness_methods.base import Context, Method
from harness_methods.deltas import branch_factors
from harness_methods.lora import add_branch, lora_config, train_only


def branch_name(stage: int) -> str:
    return f"task{stage + 1}"


class IncLoRA(Method):
    name = "inclora"
    paper_name = "IncLoRA"
    table_rank = 2

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.branches: list[str] = []

    def check(self, ctx: Context) -> None:
        lora_config(ctx, self.config)  # targets that match no module of this backbone

    def _grow(self, ctx: Context, stage: int) -> None:
        name = branch_name(stage)
        model = add_branch(ctx, name, self.config)
        self.branches.append(name)
        # Activate every branch (their outputs add up), then train the newest one only.
        model.base_model.set_adapter(self.branches)
        train_only(model, name)

    def before_task(self, ctx: Context) -> None:
        self._grow(ctx, ctx.stage)

    def task_deltas(self, ctx: Context) -> dict[str, torch.Tensor]:
        return branch_factors(ctx.model, branch_name(ctx.stage))

    def state_dict(self) -> dict[str, Any]:
        return {"branches": list(self.branches)}

    def load_state_dict(self, state: dict[str, Any], ctx: Context, completed_stages: int) -> None:
        for stage in range(completed_stages):
            self._grow(ctx, stage)
