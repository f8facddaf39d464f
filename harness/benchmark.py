"""The benchmark definition: tasks (name, category, label set) and task orders.

Tasks are data, not code: they are read from `CL_Benchmark/benchmark.toml`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from harness.errors import HarnessError
from harness.paths import BENCHMARK_DIR

DEFINITION_FILE = BENCHMARK_DIR / "benchmark.toml"


@dataclass(frozen=True)
class Task:
    name: str
    category: str
    labels: tuple[str, ...]

    @property
    def folder(self) -> str:
        """Sub-folder of the data dir, O-LoRA layout: <Category>/<name>."""
        return f"{self.category}/{self.name}"


@dataclass(frozen=True)
class Benchmark:
    tasks: dict[str, Task]
    orders: dict[int, tuple[str, ...]]
    # source (a paper or repository) -> its label of a sequence -> the sequence's tasks
    aliases: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)

    def task(self, name: str) -> Task:
        if name not in self.tasks:
            raise HarnessError(f"unknown task {name!r}; known tasks: {', '.join(self.tasks)}")
        return self.tasks[name]

    def order(self, k: int) -> tuple[str, ...]:
        if k not in self.orders:
            raise HarnessError(f"unknown order {k}; known orders: {', '.join(map(str, self.orders))}")
        return self.orders[k]

    def order_of(self, tasks) -> int | None:
        """The order with exactly these tasks in this order (a sequence is its content)."""
        return next((k for k, seq in self.orders.items() if seq == tuple(tasks)), None)

    def also_called(self, k: int) -> list[str]:
        """What other sources call order k, e.g. "GainLoRA order 3"."""
        return [f"{source} order {label}" for source, labels in self.aliases.items()
                for label, tasks in labels.items() if tasks == self.orders[k]]

    def our_label(self, source: str, label: str) -> str:
        """The order (as "k") a number that `source` published under `label` belongs to: through
        its aliases by content where it has them, else the label (our numbering is O-LoRA's)."""
        tasks = self.aliases.get(source, {}).get(label)
        if tasks is None:
            return label
        k = self.order_of(tasks)
        return str(k) if k is not None else f"{source} order {label}"

    def sequence(self, names: list[str]) -> tuple[Task, ...]:
        """The tasks of a sequence, each once: a task's column in the accuracy matrix, its data and
        its adapter are named by the task."""
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise HarnessError(f"--tasks {','.join(names)}: {', '.join(twice)} appears more than "
                               "once; a sequence holds each task once")
        return tuple(self.task(n) for n in names)


@lru_cache(maxsize=None)
def load_benchmark(path: Path = DEFINITION_FILE) -> Benchmark:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise HarnessError(f"{path}: cannot read the benchmark definition: {exc}") from exc
    tasks = {
        name: Task(name=name, category=spec["category"], labels=tuple(spec["labels"]))
        for name, spec in raw["tasks"].items()
    }
    orders = {int(k): tuple(v) for k, v in raw["orders"].items()}
    for k, seq in orders.items():
        unknown = [n for n in seq if n not in tasks]
        if unknown:
            raise HarnessError(f"{path}: order {k} names unknown tasks {unknown}")
    aliases = {source: {str(label): tuple(seq) for label, seq in labels.items()}
               for source, labels in raw.get("aliases", {}).items()}
    for source, labels in aliases.items():
        for label, seq in labels.items():
            unknown = [n for n in seq if n not in tasks]
            if unknown:
                raise HarnessError(f"{path}: alias {source} order {label} names unknown tasks {unknown}")
    return Benchmark(tasks=tasks, orders=orders, aliases=aliases)
