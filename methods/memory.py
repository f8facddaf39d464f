"""An episodic memory of earlier tasks' training examples, for the methods that keep one (Replay
mixes it into the training data, A-GEM takes its reference gradient on it), and the hooks such a
method shares: fill it after each task, carry it through a resume.

After stage t, m examples of task t are stored: a label-stratified, seeded sample of its training
set, m = `fraction` of it (at least one per label) or an absolute `per_task`; every label is kept
at least once.
"""

from __future__ import annotations

import math
from typing import Any

from harness.data import stratified_sample
from harness_methods.base import Context


class EpisodicMemory:
    def __init__(self, per_task: int | None, fraction: float):
        self.per_task, self.fraction = per_task, fraction
        self.tasks: dict[str, list[dict]] = {}  # task name -> stored records (source, target, index)

    def quota(self, n_train: int, n_labels: int) -> int:
        if self.per_task is not None:
            return self.per_task
        if self.fraction == 0:  # no memory at all, as memory_per_task = 0
            return 0
        return max(n_labels, math.ceil(self.fraction * n_train))

    def store(self, ctx: Context) -> None:
        """Keep the current task's share (seeded by the run's seed and the stage)."""
        train = ctx.task_data.train
        records = [{"source": s, "target": t, "index": i, "label": t}
                   for s, t, i in zip(train["source"], train["target"], train["index"])]
        quota = self.quota(len(records), len(ctx.task.labels))
        chosen = stratified_sample(records, quota, seed=ctx.seed * 1000 + ctx.stage)
        # Every label is kept, except with a zero quota (memory_per_task or memory_fraction 0).
        missing = {r["label"] for r in records} - {r["label"] for r in chosen} if quota else set()
        chosen += [next(r for r in records if r["label"] == lab) for lab in sorted(missing)]
        self.tasks[ctx.task.name] = [{k: r[k] for k in ("source", "target", "index")}
                                     for r in chosen]

    def earlier(self, ctx: Context) -> list[dict]:
        """Every stored record of the tasks before the current one, in storage order."""
        return [r for task, records in self.tasks.items() if task != ctx.task.name for r in records]

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.tasks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tasks = {task: list(records) for task, records in state["memory"].items()}


class MemoryHooks:
    """`after_task`, `state_dict` and `load_state_dict` of a method whose state is its `memory`
    (listed before the method's base class, so that these come first)."""

    memory: EpisodicMemory

    def after_task(self, ctx: Context) -> None:
        self.memory.store(ctx)

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict[str, Any], ctx: Context, completed_stages: int) -> None:
        self.memory.load_state_dict(state)
