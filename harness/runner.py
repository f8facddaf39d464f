"""One run (a method on a task sequence with a seed and a profile), and sweeps of runs."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import random
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from harness import faults, metrics
from harness.backbone import EmbeddedSpec, embedded_backbone_dir, load_backbone
from harness.benchmark import Task, load_benchmark
from harness.data import TaskData, load_instructions, load_task
from harness.distributed import SINGLE, World, device_for
from harness.errors import HarnessError
from harness.evaluator import evaluate_task
from harness.models import resolve_model
from harness.paths import synthetic_data_dir
from harness.profiles import Profile, load_profile
from harness.param_metrics import parameter_metrics
from harness.store import DELTAS, LOCK, RunDir, read_json, stage_name, write_atomic, write_json
from harness.synthetic import ensure_synthetic, is_synthetic
from harness.textio import Batcher
from harness.trainer import fit
from methods import registry
from methods.base import Context

log = logging.getLogger(__name__)


class RunBusy(HarnessError):
    """The run folder is locked by another process (a parallel shard or job)."""


@dataclass(frozen=True)
class RunSpec:
    method: str
    tasks: tuple[str, ...]
    seed: int
    profile: str
    order: int | None = None          # None for a custom --tasks sequence

    @property
    def sequence_name(self) -> str:
        if self.order is not None:
            return f"order{self.order}"
        return "tasks-" + "+".join(self.tasks)


@dataclass(frozen=True)
class Options:
    """Run-wide settings from the command line (the same for every run of a sweep)."""

    results: Path = Path("results")
    data_dir: Path | None = None
    model: str | None = None
    train_per_task: int | None = None
    test_per_task: int | None = None
    drop_unlabelled: bool = False
    progress: bool = True
    profile_overrides: tuple[str, ...] = ()   # --set section.key=value
    method_overrides: tuple[str, ...] = ()    # --set method.key=value
    deepspeed_config: str | None = None       # a shipped name or a file; None: the profile's
    eval_scope: str = "all"                   # "all" tasks after every stage, or "seen+next"
    eval_split: str = "test"                  # or "heldout": train.json records not trained on


def resolve_data_dir(options: Options) -> tuple[Path, str]:
    """The data dir to use, and what it is ("synthetic" or "real")."""
    data_dir = options.data_dir or (Path(os.environ["HARNESS_DATA_DIR"])
                                    if os.environ.get("HARNESS_DATA_DIR") else None)
    if data_dir is None:
        return ensure_synthetic(synthetic_data_dir()), "synthetic"
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise HarnessError(f"--data-dir {data_dir}: no such directory")
    return data_dir.resolve(), "synthetic" if is_synthetic(data_dir) else "real"


def stage_seed(seed: int, stage: int) -> int:
    """Each stage reseeds from (run seed, stage), so a resumed stage replays exactly."""
    return int(hashlib.sha256(f"{seed}:{stage}".encode()).hexdigest()[:8], 16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Runner:
    """Holds what runs of one sweep share: profile, data, backbone folder."""

    def __init__(self, profile: Profile, options: Options, world: World = SINGLE):
        self.profile = profile
        self.options = options
        self.world = world
        self.engine_config = None
        if world.engine:
            from harness.distributed import load_config

            self.engine_config = load_config(options.deepspeed_config or profile.deepspeed_config,
                                             profile, world.size)
        self.benchmark = load_benchmark()
        self.data_dir, self.data_kind = resolve_data_dir(options)
        self.instructions = load_instructions(self.data_dir)
        self._data: dict[str, TaskData] = {}
        self._model_path: str | None = None
        # The untrained backbone's accuracy and predictions per task: the base row every run of
        # the sweep shares (same backbone, data and evaluation settings), computed once.
        self._base_row: dict[str, tuple[float, list[dict]]] = {}

    # -- shared pieces -------------------------------------------------------------------------
    def task_data(self, task: Task) -> TaskData:
        if task.name not in self._data:
            self._data[task.name] = load_task(
                self.data_dir, task, self.instructions,
                train_per_task=self.options.train_per_task or self.profile.train_per_task,
                test_per_task=self.options.test_per_task or self.profile.test_per_task,
                seed=self.profile.data_seed, drop_unlabelled=self.options.drop_unlabelled,
                eval_split=self.options.eval_split)
        return self._data[task.name]

    def model_path(self) -> str:
        """The backbone folder: --model, the profile's model, or the embedded default (a GGUF
        file, a named model or a hub id resolves to a cached folder, see harness.models)."""
        if self._model_path is None:
            model = self.options.model or self.profile.model
            if not model:
                raise HarnessError(f"profile {self.profile.name!r} needs --model PATH (a local checkpoint)")
            if model == "embedded":
                # The tokenizer is trained on every task's (sub-sampled) training text.
                corpus = []
                for task in self.benchmark.tasks.values():
                    data = self.task_data(task)
                    corpus += list(data.train["source"]) + list(data.train["target"])
                spec = EmbeddedSpec.from_dict(self.profile.embedded)
                model = str(embedded_backbone_dir(corpus, spec))
            else:
                model = str(resolve_model(model))
            self._model_path = model
        return self._model_path

    def create_method(self, name: str):
        """The method plugin, refused early if the DeepSpeed config partitions what it needs."""
        method = registry.create(name, self.profile.name, self.options.method_overrides)
        if self.engine_config is not None:
            from harness.distributed import zero_stage

            stage = zero_stage(self.engine_config)
            if stage > method.max_zero_stage:
                raise HarnessError(
                    f"--deepspeed-config {self.options.deepspeed_config or self.profile.deepspeed_config}: "
                    f"method {name!r} works under ZeRO stage <= {method.max_zero_stage} (it needs whole "
                    f"gradients or per-matrix optimizer state), the config asks for stage {stage}; "
                    f"use --deepspeed-config zero{method.max_zero_stage}")
        return method

    def run_config(self, spec: RunSpec, method_config: dict) -> dict:
        config = {
            "run": asdict(spec),
            "profile": self.profile.as_dict(),
            "method_config": method_config,
            "model": self.options.model or self.profile.model,
            "benchmark": {"kind": self.data_kind, "data_dir": str(self.data_dir),
                          # Only when not the test split, so earlier runs keep their fingerprint.
                          **({"split": self.options.eval_split}
                             if self.options.eval_split != "test" else {})},
            "train_per_task": self.options.train_per_task or self.profile.train_per_task,
            "test_per_task": self.options.test_per_task or self.profile.test_per_task,
            "drop_unlabelled": self.options.drop_unlabelled,
            # Only when narrowed, so runs made before the option existed keep their fingerprint.
            **({"eval_scope": self.options.eval_scope} if self.options.eval_scope != "all" else {}),
            # The global batch is per-rank batch x accumulation x ranks: another world size is
            # another run. None: the plain single-process loop.
            "deepspeed": None if self.engine_config is None else {
                "ranks": self.world.size, "config": self.engine_config},
        }
        config["fingerprint"] = hashlib.sha256(
            json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
        config["versions"] = {p: version(p) for p in ("torch", "transformers", "peft", "datasets")}
        config["versions"]["python"] = platform.python_version()
        return config

    def run_dir(self, spec: RunSpec) -> RunDir:
        return RunDir(self.options.results / spec.profile / spec.method / spec.sequence_name /
                      f"seed{spec.seed}")

    # -- one run -------------------------------------------------------------------------------
    def run(self, spec: RunSpec, force: bool = False) -> dict:
        """Train and evaluate one run, resuming it if it was interrupted. Only one process at a
        time works on a run folder (an advisory lock inside it); another gets RunBusy."""
        run_dir = self.run_dir(spec)
        with ExitStack() as held:
            return self._run(spec, run_dir, force, held)

    def _claim(self, run_dir: RunDir, config: dict, force: bool, held: ExitStack) -> str | None:
        """Lock the run folder and clear what a killed process left: None to go on, "complete" if
        another process finished the run meanwhile, or why it cannot be run now."""
        try:
            self._lock(run_dir, held)
        except RunBusy as exc:
            return str(exc)
        if force:  # everything but the lock we hold
            for child in run_dir.path.iterdir():
                if child.name != LOCK:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        elif run_dir.is_complete():  # finished by another process while this one loaded
            return "complete"
        run_dir.remove_leftovers()
        write_json(run_dir.config_path, config)
        return None

    def _lock(self, run_dir: RunDir, held: ExitStack) -> None:
        """Create the run folder and hold its lock until `held` closes (the lock is released by
        the OS if the process dies, so a killed run never blocks a later one)."""
        try:
            run_dir.path.mkdir(parents=True, exist_ok=True)
            lock = held.enter_context(open(run_dir.path / LOCK, "a"))
        except OSError as exc:
            raise HarnessError(f"--results {self.options.results}: cannot create {run_dir.path}: "
                               f"{exc.strerror or exc}") from exc
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusy(f"{run_dir.path}: another process is running it") from None

    def _run(self, spec: RunSpec, run_dir: RunDir, force: bool, held: ExitStack) -> dict:
        method = self.create_method(spec.method)
        config = self.run_config(spec, method.recorded_config())
        if run_dir.is_complete() and not force:
            summary = read_json(run_dir.summary_path)
            if summary.get("fingerprint") != config["fingerprint"]:
                raise HarnessError(
                    f"{run_dir.summary_path}: a complete run of another configuration is here; "
                    "use another --results folder, or --force to replace it")
            log.info("%s: complete, skipped", run_dir.path)
            return summary
        if not force:
            run_dir.check_config(config)
        # Everything that can fail on bad input is loaded before the run folder is touched.
        tasks = self.benchmark.sequence(list(spec.tasks))
        data = {t.name: self.task_data(t) for t in tasks}
        backbone = load_backbone(self.model_path())
        world = self.world
        status = self._claim(run_dir, config, force, held) if world.main else None
        status = world.broadcast(status)  # only rank 0 locks and writes; the others follow it
        if status == "complete":
            return read_json(run_dir.summary_path)
        if status is not None:
            raise RunBusy(status)
        world.barrier()

        device = device_for(world)
        backbone.model.to(device)
        if self.profile.gradient_checkpointing:
            backbone.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        batcher = Batcher(backbone, self.profile.max_source_length, self.profile.max_target_length,
                          device=device)
        ctx = Context(model=backbone.model, backbone=backbone, tasks=tasks, data=data,
                      profile=self.profile, seed=spec.seed,
                      order=spec.order, batcher=batcher, device=device)
        seed_everything(spec.seed)  # after the backbone is in place, whether built or cached
        done = run_dir.completed_stages()
        evaluate = partial(evaluate_task, batcher=batcher, batch_size=self.profile.eval_batch_size,
                           max_new_tokens=self.profile.max_new_tokens, world=world,
                           bf16=self.profile.bf16 and device.type == "cuda")
        base_row = None
        if not done:  # stage 0: the backbone before any method touches it, the baseline FWT needs
            start = time.perf_counter()
            reused = all(t.name in self._base_row for t in tasks)
            for task in tasks:
                if task.name not in self._base_row:
                    self._base_row[task.name] = evaluate(ctx.model, data=data[task.name])
            base_row = {t.name: self._base_row[t.name][0] for t in tasks}
            if world.main:
                run_dir.write_stage(stage_name(0, "base"), {
                    "stage": 0, "task": None, "accuracy": base_row,
                    "eval_seconds": time.perf_counter() - start, "reused": reused},
                    [p for t in tasks for p in self._base_row[t.name][1]])
            world.barrier()
        method.setup(ctx)

        # Resume from the last complete stage that holds a checkpoint; stages after it (possible only
        # if folders were removed by hand) are trained again.
        while len(done) > 1 and not (done[-1] / "model.safetensors").exists():
            done.pop()
        if len(done) > 1:  # resume after the last complete training stage
            model_state, method_state = RunDir.load_checkpoint(done[-1])
            method.load_state_dict(method_state, ctx, completed_stages=len(done) - 1)
            missing = set(model_state) - set(ctx.model.state_dict())
            if missing:
                raise HarnessError(f"{done[-1]}: checkpoint tensors do not fit the model "
                                   f"({sorted(missing)[:3]}...)")
            ctx.model.load_state_dict(model_state, strict=False)
            log.info("%s: resuming after stage %d", run_dir.path, len(done) - 1)
        # Tensors created from here on (new branches, designed projections) are checkpointed even
        # when frozen, as are all that ever train; the rest is the backbone, rebuilt from its files.
        existing = {id(p) for p in ctx.model.parameters()}
        rows = [read_json(d / "metrics.json")["accuracy"] for d in done] or [base_row]
        # The latest row's predictions per task, for cells a method carries over unchanged.
        latest: dict[str, list[dict]] = {t.name: self._base_row[t.name][1] for t in tasks} \
            if not done else stage_predictions(done[-1])
        touched: set[str] = set(read_json(done[-1] / "metrics.json").get("saved_tensors", [])) \
            if len(done) > 1 else set()

        def evaluate_all(stage: int) -> tuple[dict[str, float], list[dict], float]:
            """Evaluate after `stage` stages: every task, or under --eval-scope seen+next the tasks
            seen so far and the next one (what LA, BWT, forgetting and FWT need; the base row and
            the last row, which AA and FWT's baseline need, are always whole)."""
            start = time.perf_counter()
            accuracy, predictions = {}, []
            scope = tasks
            if self.options.eval_scope == "seen+next" and 0 < stage < len(tasks) and not method.joint:
                scope = tasks[:stage + 1]
            for task in scope:
                if (task.name in rows[-1] and task.name in latest
                        and not method.joint and method.evaluates_as_before(ctx, task)):
                    acc, preds = rows[-1][task.name], latest[task.name]
                else:
                    method.select_for_eval(ctx, task)
                    acc, preds = evaluate(ctx.model, data=data[task.name])
                accuracy[task.name] = acc
                predictions += preds
                latest[task.name] = preds
            method.select_for_eval(ctx, None)
            return accuracy, predictions, time.perf_counter() - start

        # A kill between writing a stage and dropping its predecessor's checkpoint leaves two.
        if world.main:
            for older in done[1:-1]:
                RunDir.drop_checkpoint(older)
        previous = done[-1] if len(done) > 1 else None
        n_stages = 1 if method.joint else len(tasks)
        bar = tqdm(total=n_stages, initial=len(rows) - 1, desc=f"{spec.method} {spec.sequence_name} "
                   f"seed{spec.seed}", leave=False, disable=not self.options.progress or not world.main,
                   unit="task")
        for stage in range(len(rows) - 1, n_stages):
            ctx.stage = stage
            seed_everything(stage_seed(spec.seed, stage))
            start = time.perf_counter()
            method.before_task(ctx)
            prepare_seconds = time.perf_counter() - start
            touched |= {n for n, p in ctx.model.named_parameters()
                        if p.requires_grad or id(p) not in existing}
            trained = "all" if method.joint else tasks[stage].name
            result = fit(ctx, method, batcher, batch_size=self.profile.batch_size,
                         grad_accum=self.profile.grad_accum, epochs=self.profile.epochs,
                         max_grad_norm=self.profile.max_grad_norm, seed=stage_seed(spec.seed, stage),
                         progress=self.options.progress, desc=trained, world=world,
                         engine_config=self.engine_config)
            start = time.perf_counter()
            method.after_task(ctx)
            consolidate_seconds = time.perf_counter() - start
            deltas = method.task_deltas(ctx)
            accuracy, predictions, eval_seconds = evaluate_all(stage + 1)
            if world.main:
                params = dict(ctx.model.named_parameters())
                checkpoint = {n: params[n] for n in sorted(touched)}
                stage_dir = run_dir.write_stage(
                    stage_name(stage + 1, trained),
                    {"stage": stage + 1, "task": trained, "accuracy": accuracy,
                     "train": {**asdict(result), "ranks": world.size,
                               "prepare_seconds": prepare_seconds,
                               "consolidate_seconds": consolidate_seconds},
                     "eval_seconds": eval_seconds, "saved_tensors": sorted(touched)},
                    predictions, checkpoint=checkpoint, method_state=method.state_dict(),
                    deltas=deltas)
                faults.point("stage_done")
                if previous is not None:  # only the latest stage's checkpoint is kept
                    RunDir.drop_checkpoint(previous)
                previous = stage_dir
                bar.set_postfix(acc=f"{accuracy[ctx.task.name]:.1f}")
            world.barrier()
            rows.append(accuracy)
            bar.update(1)
        bar.close()
        summary = finish_run(run_dir, spec, [t.name for t in tasks], config) if world.main else None
        return world.broadcast(summary)


def stage_predictions(stage_dir: Path) -> dict[str, list[dict]]:
    """A stage's prediction records, by task."""
    by_task: dict[str, list[dict]] = {}
    with open(stage_dir / "predictions.jsonl", encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            by_task.setdefault(record["task"], []).append(record)
    return by_task


def run_parameter_metrics(folders: list[Path], n_trained: int) -> dict | None:
    """Parameter metrics from the trained stages' stored deltas; None unless every stage has them."""
    paths = [d / DELTAS for d in folders if not d.name.startswith("stage_00-")]
    if len(paths) != n_trained or not all(p.exists() for p in paths):
        return None
    return parameter_metrics([load_file(str(p)) for p in paths])


def finish_run(run_dir: RunDir, spec: RunSpec, names: list[str], config: dict) -> dict:
    """Write accuracy_matrix.csv and summary.json from the run's complete stage folders (also used
    for runs imported from other codebases). A stage that is missing leaves NaN cells."""
    folders = run_dir.stage_folders()
    rows = [read_json(d / "metrics.json") for d in folders]
    by_stage = {row["stage"]: row for row in rows}
    joint = any(row.get("task") == "all" for row in rows)  # one stage on the whole sequence
    n_rows = 2 if joint else len(names) + 1
    R = np.full((n_rows, len(names)), np.nan)
    for i in range(n_rows):
        if i in by_stage:
            R[i] = [by_stage[i]["accuracy"].get(n, np.nan) for n in names]
    labels = ["base"] + (["all"] if joint else list(names))
    lines = ["stage," + ",".join(names)]
    for i, values in enumerate(R):
        label = "base" if i == 0 else f"{i}-{labels[i]}"
        lines.append(label + "," + ",".join("" if np.isnan(v) else f"{v:.2f}" for v in values))
    write_atomic(run_dir.path / "accuracy_matrix.csv", "\n".join(lines) + "\n")
    train_seconds = sum(r.get("train", {}).get("seconds", 0.0) for r in rows)
    eval_seconds = sum(r.get("eval_seconds", 0.0) for r in rows)
    summary = {
        "method": spec.method, "sequence": spec.sequence_name, "order": spec.order,
        "tasks": names, "seed": spec.seed, "profile": spec.profile,
        "benchmark": config["benchmark"], "model": config["model"],
        "metrics": {k: (None if np.isnan(v) else round(v, 4))
                    for k, v in metrics.summarize(R).items()},
        "stage_average_accuracy": [  # AA_i: mean over the tasks seen after stage i
            None if np.isnan(seen).any() else round(float(np.mean(seen)), 4)
            for i in range(1, len(R))
            for seen in [R[i, :i] if len(R) == len(names) + 1 else R[i]]],
        "accuracy_matrix": [[None if np.isnan(v) else v for v in row] for row in R.tolist()],
        "row_labels": labels,
        "missing_stages": [i for i in range(n_rows) if i not in by_stage],
        "parameter_metrics": run_parameter_metrics(folders, n_rows - 1),
        "train_seconds": round(train_seconds, 3), "eval_seconds": round(eval_seconds, 3),
        "wall_seconds": round(train_seconds + eval_seconds, 3),
        "fingerprint": config["fingerprint"],
        "threads": torch.get_num_threads(),
    }
    faults.point("summary")
    write_json(run_dir.summary_path, summary)
    return summary


def runner_for(profile_name: str, options: Options, world: World = SINGLE) -> Runner:
    return Runner(load_profile(profile_name, options.profile_overrides), options, world)
