"""`harness status`: where every run of a results folder stands, read from the folder alone.

A run is complete (summary.json), running (another process holds its folder lock), failed (the
error it stopped with, in failed.json, and nobody working on it), partial (k of T stages done),
or not started (planned by a sweep, no folder yet). `run` records each sweep it is asked for in
`RESULTS/sweeps/`, so runs no process has reached yet are listed too; a sweep submitted through
Slurm also records its job, and the state of each array task is shown beside its run. Nothing
but the results tree (and, for Slurm, `squeue`/`sacct`) is read, so shards copied together from
several machines are reported as one sweep.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError
from harness.store import FAILED, STAGES, RunDir, read_json, write_atomic

SWEEPS = "sweeps"
STATES = ("complete", "running", "failed", "partial", "not started")


@dataclass
class RunStatus:
    run: str                  # the run folder, relative to the results folder
    state: str
    stages: str = "-"         # "k of T" trained stages done
    detail: str = ""          # the last error line, or the Slurm state


def record_sweep(results: Path, folders: list[Path], argv: list[str],
                 slurm: dict | None = None) -> Path:
    """Note the runs a command was asked for (the same command twice: one record)."""
    runs = sorted(str(Path(f).relative_to(results)) for f in folders)
    digest = hashlib.sha256("\n".join(runs).encode()).hexdigest()[:12]
    path = Path(results) / SWEEPS / f"{digest}.json"
    earlier = read_json(path) if path.exists() else {}
    record = {"argv": argv, "runs": runs, "slurm": slurm or earlier.get("slurm")}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=1) + "\n")
    return path


def run_status(results: Path, folder: Path) -> RunStatus:
    run_dir = RunDir(folder)
    name = str(folder.relative_to(results))
    planned = read_json(folder / STAGES) if (folder / STAGES).exists() else None
    # Stage 0 is the untrained model's row. The records are read, not the checksums of files
    # (gigabytes per stage of a large model): a damaged stage is found when the run resumes.
    done = max(0, len(run_dir.completed_stages(verify=False)) - 1)
    stages = f"{done} of {len(planned)}" if planned is not None else f"{done} of ?"
    if run_dir.is_complete():
        return RunStatus(name, "complete", stages)
    if run_dir.locked():
        return RunStatus(name, "running", stages)
    if (folder / FAILED).exists():
        return RunStatus(name, "failed", stages, read_json(folder / FAILED)["error"].splitlines()[-1])
    return RunStatus(name, "partial", stages)


def run_folders(results: Path) -> list[Path]:
    """The run folders (`<profile>/<method>/<tasks>/seed*`) at any depth below `results`: a
    results root's, and those of `harness tune`'s trials (`OUT/trials/<method>/trialNNN/...`)."""
    found = []
    for root, folders, _ in os.walk(results):
        depth = len(Path(root).relative_to(results).parts) + 1
        runs = {f for f in folders if f.startswith("seed") and depth >= 4}
        found += [Path(root) / f for f in runs]
        folders[:] = [f for f in folders if f not in runs]  # not into a run's stages and checkpoints
    return sorted(found)


def sweep_status(results: Path) -> list[RunStatus]:
    """Every run folder under `results`, and every run a recorded sweep planned."""
    results = Path(results)
    if not results.is_dir():
        raise HarnessError(f"--results {results}: no such directory")
    folders = {str(p.relative_to(results)): p for p in run_folders(results)}
    slurm_states: dict[str, str] = {}
    for record_path in sorted((results / SWEEPS).glob("*.json")):
        record = read_json(record_path)
        for run in record.get("runs", []):
            folders.setdefault(run, results / run)
        if record.get("slurm"):
            from harness.executor import array_states

            slurm_states.update(array_states(record["slurm"]))
    statuses = []
    for run, folder in sorted(folders.items()):
        status = run_status(results, folder) if folder.is_dir() else RunStatus(run, "not started")
        if run in slurm_states:
            status.detail = "; ".join(filter(None, [f"slurm {slurm_states[run]}", status.detail]))
        statuses.append(status)
    return statuses


def format_status(statuses: list[RunStatus]) -> str:
    import pandas as pd

    if not statuses:
        return "no runs"
    frame = pd.DataFrame([vars(s) for s in statuses])
    counts = frame["state"].value_counts()
    totals = ", ".join(f"{counts.get(state, 0)} {state}" for state in STATES)
    return f"{frame.to_markdown(index=False)}\n\n{len(frame)} runs: {totals}"
