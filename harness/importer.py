"""Import results of other codebases into the results store, beside the harness's own runs.

`olora`: an output folder of the O-LoRA family (O-LoRA, N-LoRA, GORP) holds one sub-folder per
stage, `<stage>-<task>` (1-based), each with an `all_results.json` whose
`predict_exact_match_for_<task>` keys are the accuracies (%) after that stage. Those codebases
never evaluate the untrained model, so the base row stays missing (and FWT with it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from harness.benchmark import load_benchmark
from harness.data import read_json_file, resolve_data_dir
from harness.errors import HarnessError
from harness.profiles import load_profile
from harness.store import RunDir, RunSpec, stage_name, write_json
from harness.summary import Summary, finish_run

log = logging.getLogger(__name__)

KEY = "predict_exact_match_for_"
STAGE_FOLDER = re.compile(r"(\d+)-(.+)")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def import_olora(source: Path, *, method: str, order: int, seed: int = 0, profile: str = "default",
                 results: Path = Path("results"), force: bool = False, model: str | None = None,
                 data_dir: Path | None = None) -> Summary:
    """Read an O-LoRA-style output folder into `results/<profile>/<method>/order<k>/seed<s>/` and
    return the run's summary. Everything is checked before anything is written."""
    source = Path(source)
    bench = load_benchmark()
    if not SAFE_NAME.fullmatch(method):
        raise HarnessError(f"--method {method!r}: expected a plain name such as olora")
    if order not in bench.orders:
        raise HarnessError(f"--order {order}: unknown order; known orders: "
                           f"{', '.join(map(str, bench.orders))}")
    if not 0 <= seed < 2**63:
        raise HarnessError(f"--seed {seed} is out of range (0 <= seed < 2**63)")
    load_profile(profile)  # unknown profiles fail here
    tasks = bench.orders[order]
    folders = _stage_folders(source, order, bench)
    spec = RunSpec(method=method, tasks=tasks, seed=seed, profile=profile, order=order)
    target = spec.folder(results)
    if target.exists() and not target.is_dir():
        raise HarnessError(f"{target}: exists and is not a run folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        # A harness run (complete or resumable) or an earlier import: never mixed, never lost.
        what = "a complete run" if RunDir(target).is_complete() else "an unfinished run"
        raise HarnessError(f"{target}: holds {what}; use another --results folder, "
                           "or --force to replace it")

    categories = {t.category for t in bench.tasks.values()}
    accuracy = {}
    for stage, folder in folders.items():
        path = folder / "all_results.json"
        if not path.exists():  # a stage that started but never finished
            log.warning("%s: no all_results.json; stage %d left missing", folder, stage)
            continue
        accuracy[stage] = _accuracies(path, order, tasks, categories)
    if not accuracy:
        raise HarnessError(f"{source}: no stage folder holds an all_results.json")

    config = {"run": asdict(spec), "source": "olora", "imported_from": str(source.resolve()),
              "model": model or "", "benchmark": {"kind": "real", "data_dir": _data_dir(data_dir)}}
    config["fingerprint"] = hashlib.sha256(
        json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]

    summary = _write_run(target, lambda run_dir: _fill(run_dir, spec, config, accuracy))
    missing = [f"{i}-{tasks[i - 1]}" for i in range(1, len(tasks) + 1) if i not in accuracy]
    log.info("imported %d of %d stages into %s%s", len(accuracy), len(tasks), target,
             f"; missing: {', '.join(missing)}" if missing else "")
    return summary


def _stage_folders(source: Path, order: int, bench) -> dict[int, Path]:
    """The stage folders by stage number; they must spell out `order`'s sequence. Sequences are
    matched by content: folders of another order are refused, naming the order (and the other
    names of it) whose tasks they hold."""
    tasks = bench.orders[order]
    if not source.is_dir():
        raise HarnessError(f"{source}: {'not a folder' if source.exists() else 'no such folder'}")
    found: dict[int, tuple[str, Path]] = {}
    for folder in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = STAGE_FOLDER.fullmatch(folder.name)
        if not match:
            raise HarnessError(f"{folder}: not a stage folder (expected <stage>-<task>, "
                               f"e.g. 1-{tasks[0]})")
        stage = int(match[1])
        if stage in found:
            raise HarnessError(f"{folder}: a second folder for stage {stage} "
                               f"(also {found[stage][1].name})")
        found[stage] = (match[2], folder)
    if not found:
        raise HarnessError(f"{source}: no stage folders (<stage>-<task>, e.g. 1-{tasks[0]})")
    for stage, (task, folder) in sorted(found.items()):
        if 1 <= stage <= len(tasks) and tasks[stage - 1] == task:
            continue
        where = (f"task {task!r} is not in order {order} ({' -> '.join(tasks)})" if task not in tasks
                 else f"{task} is stage {tasks.index(task) + 1} of order {order}, not stage {stage}")
        raise HarnessError(f"{folder}: {where}{_fitting_orders(bench, found)}")
    return {stage: folder for stage, (_, folder) in sorted(found.items())}


def _fitting_orders(bench, found: dict[int, tuple[str, Path]]) -> str:
    fits = [k for k, seq in bench.orders.items()
            if all(stage <= len(seq) and seq[stage - 1] == task for stage, (task, _) in found.items())]
    names = [f"order {k}" + (f" ({', '.join(bench.also_called(k))})" if bench.also_called(k) else "")
             for k in fits]
    return f"; these stages are those of {' or '.join(names)}" if names else ""


def _accuracies(path: Path, order: int, tasks: tuple[str, ...],
                categories: set[str]) -> dict[str, float]:
    """The per-task exact match of one all_results.json, in sequence order."""
    raw = read_json_file(path)
    if not isinstance(raw, dict):
        raise HarnessError(f"{path}: expected a JSON object")
    found = {}
    for key, value in raw.items():
        if not key.startswith(KEY):
            continue
        name = key[len(KEY):]
        if name not in tasks:
            if name in categories:  # the per-category average these codebases add
                continue
            raise HarnessError(f"{path}: {key}: {name!r} is not a task of order {order}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0 <= value <= 100:  # NaN and Infinity fail the range too
            raise HarnessError(f"{path}: {key} = {json.dumps(value)}: expected a percentage "
                               "between 0 and 100")
        found[name] = float(value)
    return {t: found[t] for t in tasks if t in found}


def _data_dir(data_dir: Path | None) -> str | None:
    """The real data the imported numbers were measured on, when known; it decides which
    harness runs share a table with the import."""
    if data_dir is None and not os.environ.get("HARNESS_DATA_DIR"):
        return None
    path, kind = resolve_data_dir(data_dir)
    if kind != "real":
        raise HarnessError(f"--data-dir {path}: is the synthetic benchmark; imported results "
                           "are on the real one")
    return str(path)


def _fill(run_dir: RunDir, spec: RunSpec, config: dict, accuracy: dict[int, dict]) -> Summary:
    write_json(run_dir.config_path, config)
    for stage, values in accuracy.items():
        task = spec.tasks[stage - 1]
        run_dir.write_stage(stage_name(stage, task), {"stage": stage, "task": task,
                            "accuracy": values, "imported": True}, predictions=[])
    return finish_run(run_dir, spec, list(spec.tasks), config)


def _write_run(target: Path, fill) -> Summary:
    """Build the run in a hidden sibling folder and rename it into place, so that a failure
    leaves the results tree as it was."""
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HarnessError(f"{target.parent}: cannot create it ({exc.strerror or exc})") from exc
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    old = tmp.with_name(tmp.name + ".replaced")
    try:
        summary = fill(RunDir(tmp))
        tmp.chmod(0o755)  # mkdtemp makes it private; results are meant to be shared
        if target.exists():  # --force: swap, so the old run is kept until the new one is in place
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)
        for folder in created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(old, ignore_errors=True)
    return summary
