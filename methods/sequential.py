"""Methods that carry one parametrisation through every task: `lora` (one adapter, as SeqLoRA) or
`full` (full fine-tuning with the shared embedding frozen, as SeqFT). SeqFT and SeqLoRA fix it;
the regularisation and replay baselines and MTL read it from their config key `base`."""

from __future__ import annotations

import torch

from harness.errors import HarnessError
from methods.base import Context, Method
from methods.deltas import StageChange
from methods.lora import add_branch

BASES = ("lora", "full")


class Sequential(Method):
    # The parametrisation; None reads the config's `base` (default "lora").
    base: str | None = None

    def setup(self, ctx: Context) -> None:
        base = self.base or self.config.get("base", "lora")
        if base == "lora":
            add_branch(ctx, "seq")
        elif base == "full":
            ctx.model.requires_grad_(True)
            ctx.model.get_input_embeddings().weight.requires_grad_(False)
        else:
            raise HarnessError(f"{self.name}: base must be one of {BASES}, got {base!r}")

    def before_task(self, ctx: Context) -> None:
        self.change = StageChange(ctx)

    def task_deltas(self, ctx: Context) -> dict[str, torch.Tensor]:
        return self.change.delta(ctx)
