"""Loading and validating task data in the O-LoRA folder layout, and building the prompts.

Layout: `<data-dir>/<Category>/<task>/{train,dev,test}.json` (JSON arrays of
`{"sentence": str, "label": str}`), `<Category>/<task>/labels.json`, and
`<data-dir>/instruction_config.json`. Every problem is reported as a `HarnessError` that names the
file and what is wrong with it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import datasets

from harness.benchmark import Task
from harness.errors import HarnessError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptFormat:
    """The reference prompt; both prefixes are on in every reference script."""

    add_task_name: bool = True
    add_dataset_name: bool = True


def build_source(task: Task, sentence: str, instruction: str | None,
                 fmt: PromptFormat = PromptFormat()) -> str:
    """The model input, byte-exact with the reference format.

    COPA carries its own question and options in `sentence`, so it gets no instruction and no
    option list.
    """
    parts = []
    if fmt.add_task_name:
        parts.append(f"Task:{task.category}\n")
    if fmt.add_dataset_name:
        parts.append(f"Dataset:{task.name}\n")
    if task.category == "COPA":
        parts.append(sentence)
    else:
        parts.append(f"{instruction}Option: {', '.join(task.labels)} \n{sentence}")
    parts.append("\nAnswer:")
    return "".join(parts)


def read_json_file(path: Path):
    if not path.exists():
        raise HarnessError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise HarnessError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise HarnessError(
            f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise HarnessError(f"{path}: not UTF-8 text at byte {exc.start}") from exc


def load_instructions(data_dir: Path) -> dict[str, str]:
    """Category -> instruction text (the first entry of each list, as `instruction_strategy single`)."""
    path = Path(data_dir) / "instruction_config.json"
    raw = read_json_file(path)
    if not isinstance(raw, dict):
        raise HarnessError(f"{path}: expected a JSON object mapping category to instructions")
    out = {}
    for category, entries in raw.items():
        if not (isinstance(entries, list) and entries and isinstance(entries[0], dict)
                and isinstance(entries[0].get("instruction"), str)):
            raise HarnessError(f"{path}: category {category!r} has no instruction entry "
                               '(expected [{"instruction": "..."}])')
        out[category] = entries[0]["instruction"]
    return out


def check_labels_file(data_dir: Path, task: Task) -> None:
    """The data's labels.json must list the benchmark's label set, in the same order (the prompt's)."""
    path = Path(data_dir) / task.folder / "labels.json"
    labels = read_json_file(path)
    if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise HarnessError(f"{path}: expected a JSON array of label strings")
    if labels != list(task.labels):
        raise HarnessError(
            f"{path}: label set {labels} differs from the benchmark definition {list(task.labels)}")


def read_split(data_dir: Path, task: Task, split: str) -> list[dict]:
    """Validated records of one split: a non-empty JSON array of objects with string sentence/label."""
    path = Path(data_dir) / task.folder / f"{split}.json"
    records = read_json_file(path)
    if not isinstance(records, list):
        raise HarnessError(f"{path}: expected a JSON array of records")
    if not records:
        raise HarnessError(f"{path}: the {split} split is empty")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "sentence" not in rec or "label" not in rec:
            raise HarnessError(f"{path}: record {i} lacks a 'sentence' or 'label' field")
        if not isinstance(rec["sentence"], str) or not isinstance(rec["label"], str):
            raise HarnessError(f"{path}: record {i} has a non-string 'sentence' or 'label'")
    return [{"sentence": r["sentence"], "label": r["label"]} for r in records]


def stratified_sample(records: list[dict], n: int | None, seed: int) -> list[dict]:
    """At most `n` records, label proportions kept (largest remainder), seeded; None keeps all.

    Written here rather than with `datasets.train_test_split(stratify_by_column=...)`, which needs
    a ClassLabel column and at least two members per class, and does not keep file order.
    Sampled records keep their file order, so a prefix of the data is never favoured.
    """
    if n is None or n >= len(records):
        return list(records)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        by_label[rec["label"]].append(i)
    labels = sorted(by_label)
    exact = {lab: n * len(by_label[lab]) / len(records) for lab in labels}
    quota = {lab: int(exact[lab]) for lab in labels}
    for lab in sorted(labels, key=lambda la: (quota[la] - exact[la], la))[: n - sum(quota.values())]:
        quota[lab] += 1
    rng = random.Random(seed)
    chosen = sorted(i for lab in labels for i in rng.sample(by_label[lab], quota[lab]))
    return [records[i] for i in chosen]


@dataclass
class TaskData:
    task: Task
    train: datasets.Dataset   # columns: source, target, label, index
    test: datasets.Dataset
    unlabelled_in_test: int   # test records whose label is outside the label set (kept or dropped)

    @functools.cached_property
    def test_columns(self) -> dict[str, list]:
        """The test split's columns as lists, read once: the test set is scored after every stage,
        and reading its three columns from Arrow took 0.9 ms each time, scoring the task 0.04 ms."""
        return self.test.to_dict()


def read_labelled(data_dir: Path, task: Task, split: str,
                  drop_unlabelled: bool) -> tuple[list[dict], int]:
    """A split's records (each with its `index` in the file) and how many have a label outside
    labels.json: refused in train, kept (or dropped) and reported in test (see `load_task`)."""
    label_set = set(task.labels)
    records = [dict(r, index=i) for i, r in enumerate(read_split(data_dir, task, split))]
    outside = [r for r in records if r["label"] not in label_set]
    if outside:
        path = data_dir / task.folder / f"{split}.json"
        seen = sorted({r["label"] for r in outside})[:5]
        if split == "train" and not drop_unlabelled:
            raise HarnessError(
                f"{path}: {len(outside)} records have labels outside labels.json "
                f"(e.g. {seen}); fix the data or pass --drop-unlabelled")
        action = "dropped (--drop-unlabelled)" if drop_unlabelled else \
            "kept and scored as errors, as the reference does"
        log.warning("%s: %d records with labels outside labels.json %s: %s",
                    path, len(outside), seen, action)
        if drop_unlabelled:
            records = [r for r in records if r["label"] in label_set]
            if not records:
                raise HarnessError(f"{path}: no records left after dropping unlabelled ones")
    return records, len(outside)


def load_task(data_dir: Path, task: Task, instructions: dict[str, str], *,
              train_per_task: int | None = None, test_per_task: int | None = None,
              seed: int = 0, drop_unlabelled: bool = False,
              fmt: PromptFormat = PromptFormat(), eval_split: str = "test") -> TaskData:
    """Read, validate, sub-sample and format one task.

    Labels outside labels.json: in the test split they are kept by default, as the reference does
    (they then count as errors; the real MNLI test has 131 records labelled `-`), and reported once;
    `drop_unlabelled` removes them. In the train split they are an error unless dropped.

    `eval_split="heldout"` puts in `test` a stratified sample of the train split's records that the
    training sub-sample left out, for choosing hyperparameters without the test split (upstream
    `dev.json` is a copy of `test.json`); the training sub-sample is the same either way.
    """
    data_dir = Path(data_dir)
    check_labels_file(data_dir, task)
    if task.category != "COPA" and task.category not in instructions:
        raise HarnessError(
            f"{data_dir / 'instruction_config.json'}: no instruction for category {task.category!r}")
    instruction = instructions.get(task.category)

    def dataset(records: list[dict]) -> datasets.Dataset:
        return datasets.Dataset.from_dict({
            "source": [build_source(task, r["sentence"], instruction, fmt) for r in records],
            "target": [r["label"] for r in records],
            "index": [r["index"] for r in records],
        })

    records, _ = read_labelled(data_dir, task, "train", drop_unlabelled)
    train = stratified_sample(records, train_per_task, seed)
    if eval_split == "heldout":
        chosen = {r["index"] for r in train}
        rest = [r for r in records if r["index"] not in chosen]
        if not rest:
            raise HarnessError(f"{data_dir / task.folder / 'train.json'}: no records left for a "
                               f"held-out split; set --train-per-task below {len(records)}")
        test, n_outside = stratified_sample(rest, test_per_task, seed + 1), 0
    else:
        test, n_outside = read_labelled(data_dir, task, "test", drop_unlabelled)
        test = stratified_sample(test, test_per_task, seed + 1)
    return TaskData(task=task, train=dataset(train), test=dataset(test), unlabelled_in_test=n_outside)


def dev_copies_test(data_dir: Path, tasks) -> list[str]:
    """The tasks whose dev.json is a byte copy of test.json (in upstream CL_Benchmark: all 15)."""
    copies = []
    for task in tasks:
        dev, test = (Path(data_dir) / task.folder / f"{split}.json" for split in ("dev", "test"))
        if dev.is_file() and test.is_file() and dev.stat().st_size == test.stat().st_size \
                and dev.read_bytes() == test.read_bytes():
            copies.append(task.name)
    return copies


_NOTED_COPIES: set[Path] = set()


def note_dev_copies(data_dir: Path, tasks) -> None:
    """Say once per data folder and process that its dev split is the test split."""
    if data_dir in _NOTED_COPIES:
        return
    _NOTED_COPIES.add(data_dir)
    tasks = list(tasks)
    copies = dev_copies_test(data_dir, tasks)
    if copies:
        log.warning("%s: dev.json is a copy of test.json for %d of %d tasks (%s): settings chosen "
                    "on it are chosen on the test set; choose them with --eval-split heldout or "
                    "`harness tune`, which use records of train.json instead", data_dir,
                    len(copies), len(tasks), ", ".join(copies[:3]) + (", ..." if len(copies) > 3 else ""))


def data_digest(data_dir: Path, tasks, files: tuple[str, ...]) -> str:
    """The identity of the data of `tasks` (each one's `files` and the instructions), wherever the
    folder lies: machines that share a study or a run name the same data by different paths."""
    digest = hashlib.sha256()
    paths = [Path(data_dir) / "instruction_config.json"] + [
        Path(data_dir) / task.folder / name for task in tasks for name in files]
    for path in paths:
        try:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError as exc:
            raise HarnessError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return digest.hexdigest()[:16]


def resolve_data_dir(data_dir: Path | str | None) -> tuple[Path, str]:
    """The data folder to use (`--data-dir`, else $HARNESS_DATA_DIR, else the synthetic benchmark,
    written on first use), and what it is: "synthetic" or "real"."""
    from harness.paths import synthetic_data_dir
    from harness.synthetic import ensure_synthetic, is_synthetic

    data_dir = data_dir or os.environ.get("HARNESS_DATA_DIR") or None
    if data_dir is None:
        return ensure_synthetic(synthetic_data_dir()), "synthetic"
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise HarnessError(f"--data-dir {data_dir}: no such directory")
    return data_dir.resolve(), "synthetic" if is_synthetic(data_dir) else "real"
