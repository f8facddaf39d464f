"""Replay: a fixed-size, label-stratified, seeded memory of earlier tasks' training examples, mixed
into the training set of each later stage (no reference code).

After stage t, m examples of task t are stored (default m = 2% of its training set, at least one per
label; or an absolute `memory_per_task`). At stage t > 1 the training set is the current task plus
the union of all memories, shuffled together. Base: one LoRA adapter (`base = "lora"`) or full
fine-tuning (`base = "full"`).
"""

from __future__ import annotations

from typing import Any

import datasets

from harness_methods.base import Context
from harness_methods.memory import EpisodicMemory, MemoryHooks
from harness_methods.sequential import Sequential


class Replay(MemoryHooks, Sequential):
    name = "replay"
    paper_name = "Replay"
    table_rank = 3

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        per_task = (self.number("memory_per_task", integer=True, low=0)
                    if "memory_per_task" in self.config else None)
        self.memory = EpisodicMemory(per_task, self.number("memory_fraction", 0.02, low=0, high=1))

    def training_data(self, ctx: Context) -> datasets.Dataset:
        current = ctx.task_data.train
        stored = self.memory.earlier(ctx)
        if not stored:
            return current
        return datasets.concatenate_datasets(
            [current, datasets.Dataset.from_list(stored, features=current.features)])
