"""SeqLoRA: one LoRA adapter (peft) trained through all tasks; the backbone stays frozen
. The optimizer is re-created at every stage; the adapter carries over."""

from __future__ import annotations

from harness_methods.sequential import Sequential


class SeqLoRA(Sequential):
    name = "seqlora"
    paper_name = "SeqLoRA"
    table_rank = 1
    base = "lora"
