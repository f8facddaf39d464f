"""SeqLoRA: one LoRA adapter (peft) trained through all tasks; the backbone stays frozen
(METHODS.md §5.2). The optimizer is re-created at every stage; the adapter carries over."""

from __future__ import annotations

from methods.base import Context, Method
from methods.lora import add_branch


class SeqLoRA(Method):
    name = "seqlora"

    def setup(self, ctx: Context) -> None:
        add_branch(ctx, "seq")
