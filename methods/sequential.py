"""The two parametrisations the regularisation and replay baselines build on (config `base`):
`lora` (one adapter through all tasks, as SeqLoRA) or `full` (full fine-tuning, as SeqFT)."""

from __future__ import annotations

from harness.errors import HarnessError
from methods.base import Context
from methods.lora import add_branch


def setup_base(ctx: Context, method_name: str) -> None:
    base = ctx.config.get("base", "lora")
    if base == "lora":
        add_branch(ctx, "seq")
    elif base == "full":
        ctx.model.requires_grad_(True)
        ctx.model.get_input_embeddings().weight.requires_grad_(False)
    else:
        raise HarnessError(f"{method_name}: base must be 'lora' or 'full', got {base!r}")
