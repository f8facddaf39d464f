"""Replay: a fixed-size, label-stratified, seeded memory of earlier tasks' training examples, mixed
into the training set of each later stage (no reference code).

After stage t, m examples of task t are stored (default m = 2% of its training set, at least one per
label; or an absolute `memory_per_task`). At stage t > 1 the training set is the current task plus
the union of all memories, shuffled together. Base: one LoRA adapter (`base = "lora"`) or full
fine-tuning (`base = "full"`).
"""

from __future__ import annotations

import math
from typing import Any

import datasets

from harness.data import stratified_sample
from methods.base import Context
from methods.sequential import Sequential


class Replay(Sequential):
    name = "replay"
    paper_name = "Replay"
    table_rank = 3

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self.per_task = (self.number("memory_per_task", integer=True, low=0)
                         if "memory_per_task" in self.config else None)
        self.fraction = self.number("memory_fraction", 0.02, low=0, high=1)
        self.memory: dict[str, list[dict]] = {}  # task name -> stored records

    def quota(self, n_train: int, n_labels: int) -> int:
        if self.per_task is not None:
            return self.per_task
        return max(n_labels, math.ceil(self.fraction * n_train))

    def training_data(self, ctx: Context) -> datasets.Dataset:
        current = ctx.task_data.train
        stored = [r for task, records in self.memory.items() if task != ctx.task.name
                  for r in records]
        if not stored:
            return current
        return datasets.concatenate_datasets(
            [current, datasets.Dataset.from_list(stored, features=current.features)])

    def after_task(self, ctx: Context) -> None:
        train = ctx.task_data.train
        records = [{"source": s, "target": t, "index": i, "label": t}
                   for s, t, i in zip(train["source"], train["target"], train["index"])]
        chosen = stratified_sample(records, self.quota(len(records), len(ctx.task.labels)),
                                   seed=ctx.seed * 1000 + ctx.stage)
        missing = {r["label"] for r in records} - {r["label"] for r in chosen}
        chosen += [next(r for r in records if r["label"] == lab) for lab in sorted(missing)]
        self.memory[ctx.task.name] = [{k: r[k] for k in ("source", "target", "index")}
                                      for r in chosen]

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory}

    def load_state_dict(self, state: dict[str, Any], ctx: Context, completed_stages: int) -> None:
        self.memory = {task: list(records) for task, records in state["memory"].items()}
