"""Methods that carry one parametrisation through every task: `lora` (one adapter, as SeqLoRA) or
`full` (full fine-tuning with the shared embedding frozen, as SeqFT). SeqFT and SeqLoRA fix it;
the regularisation and replay baselines and MTL read it from their config key `base`."""

from __future__ import annotations

from typing import Any

import torch

from harness_methods.base import Context, Method
from harness_methods.deltas import StageChange
from harness_methods.lora import add_branch, lora_config

BASES = ("lora", "full")


class Sequential(Method):
    # The parametrisation a subclass fixes; None reads the config's `base` (default "lora").
    fixed_parametrisation: str | None = None

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.parametrisation = self.fixed_parametrisation or self.choice("base", BASES, "lora")
        self.change: StageChange | None = None

    def check(self, ctx: Context) -> None:
        if self.parametrisation == "lora":  # targets that match no module of this backbone
            lora_config(ctx, self.config)

    def setup(self, ctx: Context) -> None:
        if self.parametrisation == "lora":
            add_branch(ctx, "seq", self.config)
        else:
            ctx.model.requires_grad_(True)
            ctx.model.get_input_embeddings().weight.requires_grad_(False)

    def before_task(self, ctx: Context) -> None:
        self.change = StageChange(ctx, self.config)

    def task_deltas(self, ctx: Context) -> dict[str, torch.Tensor]:
        return self.change.delta(ctx)
