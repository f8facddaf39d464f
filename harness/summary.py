"""`summary.json`, the results store's record of one finished run: its schema, how it is made
from a run folder's stages (`finish_run`) and how it is read back (`read_summary`,
`read_summaries`). Tables, plots and the importer go through this module only.

Fields (percentages are exact-match accuracies, 0-100; null where a cell or metric is missing):

- `method`, `sequence` (`order<k>` or `tasks-a+b+...`), `order` (null for a custom sequence),
  `tasks` (in training order), `seed`, `profile`, `model` (as given: a path, a name or a hub id);
- `benchmark`: `kind` ("synthetic" or "real"), `data_dir`, `data` (a digest of the files the run
  read; absent in runs recorded before it), and `split` when not "test";
- `tuned`: the settings `harness tune` chose and `run --tuned` applied, or null (the method's
  config file);
- `metrics`: AA, LA, BWT, FWT, forgetting (harness.metrics), over `accuracy_matrix`, and BWT and
  forgetting split into their `_format` and `_label` parts (`metrics.forgetting_by_kind`);
- `stage_average_accuracy`: AA_i, the mean over the tasks seen after stage i;
- `accuracy_matrix`: R, one row per stage (row 0: the untrained model), one column per task;
  `row_labels` names the rows ("base", then the task trained, or "all" for a joint run);
- `format_matrix`: O, the same cells as R: the share (%) of the predictions outside the task's
  label set (format forgetting), null where a stage stored none; empty for imported runs;
- `missing_stages`: rows with no complete stage folder (their cells are null);
- `parameter_metrics`: harness.param_metrics over the stored per-task deltas, or null;
- `train_seconds`, `eval_seconds`, `train_eval_seconds` (their sum: the stages' training and
  evaluation, over every process that worked on the run; not wall time, which a resumed run
  spreads over several processes), `threads` (torch's, in the writing process);
- `efficiency`: training FLOPs (harness.efficiency: counted once per batch shape) and what they
  make of the device: `train_flops`, `achieved_flops` (FLOP/s over `train_seconds`),
  `peak_flops` and `peak_source`, `share_of_peak`, and `stage_share_of_peak` (one per trained
  stage); null for runs imported or made before it was recorded;
- `warnings`: what the method or the engine warned of while training, one object per warning:
  `stage` (1-based), `task` (the stage's), `message` (the stage folders' `metrics.json` keep their
  own; the whole log of every process that worked on the run is `run.log` in its folder);
- `fingerprint`: the hash of the run's configuration (config.json) with its data named by the
  digest rather than its folder, which decides whether a later command may resume or skip the
  run (on another machine too, wherever the same data lies).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness import faults, metrics
from harness.errors import HarnessError
from harness.store import DELTAS, RunDir, RunSpec, read_json, write_atomic, write_json

# The label of a run made with `run --tuned` (settings chosen by `harness tune` on held-out data),
# beside the runs of its method with the settings of its config file.
TUNED = " (tuned)"
REQUIRED = ("method", "sequence", "tasks", "seed", "profile", "benchmark", "metrics",
            "accuracy_matrix")


@dataclass(kw_only=True)
class Summary:
    method: str
    sequence: str
    order: int | None = None
    tasks: list[str]
    seed: int
    profile: str
    benchmark: dict[str, Any]
    model: str | None = None
    tuned: dict[str, float] | None = None
    metrics: dict[str, float | None]
    stage_average_accuracy: list[float | None] = field(default_factory=list)
    accuracy_matrix: list[list[float | None]]
    format_matrix: list[list[float | None]] = field(default_factory=list)
    row_labels: list[str] = field(default_factory=list)
    missing_stages: list[int] = field(default_factory=list)
    parameter_metrics: dict[str, Any] | None = None
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    train_eval_seconds: float = 0.0
    fingerprint: str = ""
    threads: int | None = None
    efficiency: dict[str, Any] | None = None
    warnings: list[dict[str, Any]] = field(default_factory=list)
    # The run folder it was read from (not part of the file).
    folder: Path | None = field(default=None, repr=False, compare=False, metadata={"stored": False})

    @property
    def label(self) -> str:
        """The method as tables and figures name it: a tuned run apart from the untuned one."""
        return self.method + (TUNED if self.tuned else "")

    @property
    def joint(self) -> bool:
        """One training stage on the whole sequence (R has a base row and one more)."""
        return len(self.accuracy_matrix) != len(self.tasks) + 1

    def matrix(self) -> np.ndarray:
        """R as floats, NaN for a missing cell."""
        return np.array([[np.nan if v is None else v for v in row] for row in self.accuracy_matrix],
                        dtype=float)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("stored", True)}

    @classmethod
    def from_json(cls, data: Any, source: Path | str) -> "Summary":
        """A summary from its JSON form; a file that is not one is refused, naming it. Fields this
        version does not know are ignored, so newer files stay readable."""
        if not isinstance(data, dict):
            raise HarnessError(f"{source}: corrupt summary (not a JSON object)")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise HarnessError(f"{source}: corrupt summary (no {', '.join(missing)})")
        known = {f.name for f in dataclasses.fields(cls) if f.metadata.get("stored", True)}
        if "wall_seconds" in data:  # its name in earlier versions: the same sum
            data = {"train_eval_seconds": data["wall_seconds"], **data}
        summary = cls(**{k: v for k, v in data.items() if k in known})
        if not (isinstance(summary.metrics, dict) and isinstance(summary.benchmark, dict)
                and "kind" in summary.benchmark and isinstance(summary.tasks, list)
                and all(isinstance(row, list) and len(row) == len(summary.tasks)
                        for row in summary.accuracy_matrix)):
            raise HarnessError(f"{source}: corrupt summary (metrics, benchmark, tasks and "
                               "accuracy_matrix do not fit together)")
        if not summary.row_labels:
            summary.row_labels = ["base"] + (["all"] if summary.joint else list(summary.tasks))
        return summary


def read_summary(path: Path) -> Summary:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HarnessError(f"{path}: corrupt summary ({type(exc).__name__}: {exc})") from exc
    summary = Summary.from_json(data, path)
    summary.folder = path.parent
    return summary


def read_summaries(results: Path, profile: str | None = None) -> list[Summary]:
    """Every finished run under `results` (of `profile`, if given), in path order. Runs without a
    summary.json are unfinished and left out."""
    summaries = [read_summary(p) for p in sorted(Path(results).glob("*/*/*/seed*/summary.json"))]
    return [s for s in summaries if not profile or s.profile == profile]


def stage_predictions(stage_dir: Path) -> dict[str, list[dict]]:
    """A stage's prediction records, by task."""
    by_task: dict[str, list[dict]] = {}
    with open(stage_dir / "predictions.jsonl", encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            by_task.setdefault(record["task"], []).append(record)
    return by_task


def final_outcomes(folder: Path) -> dict[tuple[str, int], bool]:
    """Whether each test item was answered right after the last stage, `(task, index) -> correct`,
    from a finished run's last stage folder: its row is whole, and a cell the method carried over
    is stored with its predictions. Empty for an imported run (no predictions)."""
    stages = sorted(Path(folder).glob("stage_[0-9][0-9]-*"))
    if not stages:
        return {}
    return {(task, r["index"]): bool(r["correct"])
            for task, records in stage_predictions(stages[-1]).items() for r in records}


def run_parameter_metrics(folders: list[Path], n_trained: int) -> dict | None:
    """Parameter metrics from the trained stages' stored deltas; None unless every stage has them."""
    from safetensors.torch import load_file

    from harness.param_metrics import parameter_metrics

    paths = [d / DELTAS for d in folders if not d.name.startswith("stage_00-")]
    if len(paths) != n_trained or not all(p.exists() for p in paths):
        return None
    return parameter_metrics([load_file(str(p)) for p in paths])


def _accuracy_matrix(rows: list[dict], names: list[str]) -> tuple[np.ndarray, list[str], list[int]]:
    """R from the stage folders' metrics (NaN where a stage is missing), its row labels and the
    missing rows."""
    by_stage = {row["stage"]: row for row in rows}
    joint = any(row.get("task") == "all" for row in rows)  # one stage on the whole sequence
    n_rows = 2 if joint else len(names) + 1
    R = np.full((n_rows, len(names)), np.nan)
    for i in range(n_rows):
        if i in by_stage:
            R[i] = [by_stage[i]["accuracy"].get(n, np.nan) for n in names]
    labels = ["base"] + (["all"] if joint else list(names))
    return R, labels, [i for i in range(n_rows) if i not in by_stage]


def _format_matrix(folders: list[Path], rows: list[dict], names: list[str],
                   shape: tuple[int, int]) -> np.ndarray:
    """O: for each cell of R, the share (%) of its predictions outside the task's label set
    (normalised as the evaluator compares); NaN where the stage stored no predictions."""
    from harness.benchmark import load_benchmark

    tasks = load_benchmark().tasks
    O = np.full(shape, np.nan)
    for folder, row in zip(folders, rows):
        for task, records in stage_predictions(folder).items():
            labels = {metrics.normalize(label) for label in tasks[task].labels}
            outside = [metrics.normalize(r["prediction"]) not in labels for r in records if "prediction" in r]
            if outside and row["stage"] < shape[0]:
                O[row["stage"], names.index(task)] = 100.0 * float(np.mean(outside))
    return O


def _write_matrix_csv(path: Path, R: np.ndarray, labels: list[str], names: list[str]) -> None:
    lines = ["stage," + ",".join(names)]
    for i, values in enumerate(R):
        label = "base" if i == 0 else f"{i}-{labels[i]}"
        lines.append(label + "," + ",".join("" if np.isnan(v) else f"{v:.2f}" for v in values))
    write_atomic(path, "\n".join(lines) + "\n")


def _cells(M: np.ndarray) -> list[list[float | None]]:
    """A matrix as JSON: NaN (a cell not evaluated) as null."""
    return [[None if np.isnan(v) else v for v in row] for row in M.tolist()]


def run_efficiency(stages: list[dict]) -> dict[str, Any] | None:
    """The run's training FLOPs over its training time, against the peak its stages recorded
    (harness.efficiency); None when a stage recorded none (an imported or older run)."""
    from harness.efficiency import Peak, stage_efficiency

    if not stages or any("flops" not in t or "peak_flops" not in t for t in stages):
        return None
    run = stage_efficiency(sum(t["flops"] for t in stages), sum(t["seconds"] for t in stages),
                           Peak(stages[-1]["peak_flops"], stages[-1]["peak_source"]))
    return {"train_flops": run.pop("flops"), **run,
            "stage_share_of_peak": [t["share_of_peak"] for t in stages]}


def finish_run(run_dir: RunDir, spec: RunSpec, names: list[str], config: dict) -> Summary:
    """Write accuracy_matrix.csv and summary.json from the run's complete stage folders (also used
    for runs imported from other codebases). A stage that is missing leaves NaN cells."""
    import torch  # here, not above: what reads summaries (tables, report, status) needs no torch

    # Checked when the run resumed or written by it since: not read through a second time.
    folders = run_dir.stage_folders(verify=False)
    rows = [read_json(d / "metrics.json") for d in folders]
    R, labels, missing = _accuracy_matrix(rows, names)
    O = _format_matrix(folders, rows, names, R.shape)
    has_format = not np.isnan(O).all()  # imported runs store no predictions
    _write_matrix_csv(run_dir.path / "accuracy_matrix.csv", R, labels, names)
    if has_format:
        _write_matrix_csv(run_dir.path / "format_matrix.csv", O, labels, names)
    split = metrics.forgetting_by_kind(R, O)
    train_seconds = sum(r.get("train", {}).get("seconds", 0.0) for r in rows)
    eval_seconds = sum(r.get("eval_seconds", 0.0) for r in rows)
    summary = Summary(
        method=spec.method, sequence=spec.sequence_name, order=spec.order, tasks=names,
        seed=spec.seed, profile=spec.profile, benchmark=config["benchmark"], model=config["model"],
        tuned=config.get("tuned"),
        metrics={k: (None if np.isnan(v) else round(v, 4))
                 for k, v in {**metrics.summarize(R), **split}.items()},
        stage_average_accuracy=[  # AA_i: mean over the tasks seen after stage i
            None if np.isnan(seen).any() else round(float(np.mean(seen)), 4)
            for i in range(1, len(R))
            for seen in [R[i, :i] if len(R) == len(names) + 1 else R[i]]],
        accuracy_matrix=_cells(R), format_matrix=_cells(O) if has_format else [],
        row_labels=labels, missing_stages=missing,
        parameter_metrics=run_parameter_metrics(folders, len(R) - 1),
        train_seconds=round(train_seconds, 3), eval_seconds=round(eval_seconds, 3),
        train_eval_seconds=round(train_seconds + eval_seconds, 3),
        fingerprint=config["fingerprint"], threads=torch.get_num_threads(),
        efficiency=run_efficiency([r["train"] for r in rows if "train" in r]),
        warnings=[{"stage": r["stage"], "task": r["task"], "message": message}
                  for r in rows for message in r.get("warnings", [])])
    faults.point("summary")
    write_json(run_dir.summary_path, summary.to_json())
    return summary
