"""One run: a method on a task sequence, with a seed and a profile, trained stage by stage and
evaluated after each (the accuracy matrix), resumable at any stage boundary."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import platform
import random
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from harness import faults
from harness.backbone import EmbeddedSpec, embedded_backbone_dir, load_backbone
from harness.benchmark import Task, load_benchmark
from harness.checkpoints import StepCheckpoints
from harness.data import (TaskData, data_digest, load_instructions, load_task, note_dev_copies,
                          resolve_data_dir)
from harness.distributed import SINGLE, World, device_for
from harness.efficiency import device_peak, stage_efficiency
from harness.errors import HarnessError
from harness.evaluator import evaluate_task
from harness.models import resolve_model
from harness.profiles import Profile, load_profile
from harness.runlog import QUIET, RunLog
from harness.store import (FAILED, LOCK, STAGES, RunDir, RunSpec, config_fingerprint, out_of_space,
                           read_json, record_failure, stage_name, write_json)
from harness.summary import Summary, finish_run, read_summary, stage_predictions
from harness.synthetic import tokenizer_corpus, tokenizer_phrases
from harness.textio import Batcher
from harness.tracking import Tracking, open_tracking
from harness.trainer import FitSettings, fit
from harness_methods import registry
from harness_methods.base import Context, Method

log = logging.getLogger(__name__)


class RunBusy(HarnessError):
    """The run folder is locked by another process (a parallel shard or job)."""


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
    eval_scope: str = "all"                   # "all" tasks after every stage, "seen+next", or
    #                                           "last" (the last row only: what AA reads; tuning)
    eval_split: str = "test"                  # or "heldout": train.json records not trained on
    tuned: dict[str, dict[str, float]] | None = None  # --tuned FILE: method -> its chosen settings
    report_to: tuple[str, ...] = ()           # trackers (harness.tracking); not in the config
    mlflow_uri: str | None = None             # an MLflow server; None: RESULTS/mlflow.db


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
        self.data_dir, self.data_kind = resolve_data_dir(options.data_dir)
        note_dev_copies(self.data_dir, self.benchmark.tasks.values())
        self.instructions = load_instructions(self.data_dir)
        self._data: dict[str, TaskData] = {}
        self._digests: dict[tuple[str, ...], str] = {}
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
            # Rank 0 builds or converts a cached folder and the other ranks take its path:
            # transformers' save_pretrained writes nothing on a rank other than 0, so a folder
            # another rank built would have no weights and no config.json.
            self._model_path = self.world.broadcast(self._resolve_model() if self.world.main else None)
        return self._model_path

    def _resolve_model(self) -> str:
        model = self.options.model or self.profile.model
        if not model:
            raise HarnessError(f"profile {self.profile.name!r} needs --model PATH (a local checkpoint)")
        if model != "embedded":
            return str(resolve_model(model))
        # One backbone per machine and setting, whatever the data folder: the tokenizer is trained
        # on the synthetic generator's own text, as a pretrained model's is on its own corpus.
        spec = EmbeddedSpec.from_dict(self.profile.embedded)
        return str(embedded_backbone_dir(tokenizer_corpus(), spec, tokenizer_phrases()))

    def create_method(self, name: str):
        """The method plugin, refused early if the DeepSpeed config partitions what it needs."""
        tuned = [f"method.{key}={value!r}" for key, value in self.tuned_settings(name).items()]
        method = registry.create(name, self.profile.name, (*tuned, *self.options.method_overrides))
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

    def tuned_settings(self, name: str) -> dict[str, float]:
        return (self.options.tuned or {}).get(name, {})

    def run_config(self, spec: RunSpec, method_config: dict) -> dict:
        config = {
            "run": asdict(spec),
            "profile": self.profile.as_dict(),
            "method_config": method_config,
            "model": self.options.model or self.profile.model,
            "benchmark": {"kind": self.data_kind, "data_dir": str(self.data_dir),
                          "data": self.data_identity(tuple(spec.tasks)),
                          # Only when not the test split, so earlier runs keep their fingerprint.
                          **({"split": self.options.eval_split}
                             if self.options.eval_split != "test" else {})},
            "train_per_task": self.options.train_per_task or self.profile.train_per_task,
            "test_per_task": self.options.test_per_task or self.profile.test_per_task,
            "drop_unlabelled": self.options.drop_unlabelled,
            # Only when narrowed, so runs made before the option existed keep their fingerprint.
            **({"eval_scope": self.options.eval_scope} if self.options.eval_scope != "all" else {}),
            # Settings chosen by `harness tune` (in method_config too): such runs never mix with
            # runs of the config file's settings, and the tables mark them.
            **({"tuned": self.tuned_settings(spec.method)} if self.tuned_settings(spec.method) else {}),
            # The global batch is per-rank batch x accumulation x ranks: another world size is
            # another run. None: the plain single-process loop.
            "deepspeed": None if self.engine_config is None else {
                "ranks": self.world.size, "config": self.engine_config},
        }
        config["fingerprint"] = self._fingerprint(spec, config)
        config["versions"] = {p: version(p) for p in ("torch", "transformers", "peft", "datasets")}
        config["versions"]["python"] = platform.python_version()
        return config

    def data_identity(self, tasks: tuple[str, ...]) -> str:
        """The digest of the files a run of `tasks` reads (the instructions, and each task's
        training records, labels and, unless the held-out split is evaluated, test records): a
        run's fingerprint and a tuning's setup name their data by it."""
        if tasks not in self._digests:
            evaluated = ("test.json",) if self.options.eval_split == "test" else ()
            files = ("train.json", "labels.json", *evaluated)
            self._digests[tasks] = data_digest(self.data_dir, self.benchmark.sequence(list(tasks)), files)
        return self._digests[tasks]

    def _fingerprint(self, spec: RunSpec, config: dict) -> str:
        """By the data's content; a run folder recorded before that (its data named by folder)
        keeps its fingerprint, so that it resumes or is skipped as before."""
        by_folder = config_fingerprint(config, by_folder=True)
        if self.run_dir(spec).recorded_fingerprint() == by_folder:
            return by_folder
        return config_fingerprint(config)

    def run_dir(self, spec: RunSpec) -> RunDir:
        return RunDir(spec.folder(self.options.results, tuned=bool(self.tuned_settings(spec.method))))

    # -- one run -------------------------------------------------------------------------------
    def run(self, spec: RunSpec, force: bool = False) -> Summary:
        """Train and evaluate one run, resuming it if it was interrupted. Only one process at a
        time works on a run folder (an advisory lock inside it); another gets RunBusy."""
        run_dir = self.run_dir(spec)
        # Subnormal floats (gradients of a well-fit model, tiny Adam moments) are computed by
        # microcode on x86: measured, they made SeqLoRA's steps on the embedded default twice as
        # slow as PerTaskFT's. Flushed to zero, as GPUs and most training frameworks do.
        torch.set_flush_denormal(True)
        try:
            with ExitStack() as held:
                return self._run(spec, run_dir, force, held)
        except Exception as exc:
            if out_of_space(exc):  # what was being written is a temporary file, already removed
                raise HarnessError(
                    f"{run_dir.path}: no space left on the device of the results folder; every "
                    "stage and checkpoint written so far is whole: free space and run the same "
                    "command again to resume") from None
            raise

    @staticmethod
    def _record_failure(run_dir: RunDir, kind, error, trace) -> bool:
        """On leaving a claimed run by an error (not an interrupt), keep it for `harness status`
        while the lock is still held; the error goes on."""
        if isinstance(error, Exception):
            record_failure(run_dir.path, error)
        return False

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
        (run_dir.path / FAILED).unlink(missing_ok=True)  # an earlier attempt's error
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

    def _run(self, spec: RunSpec, run_dir: RunDir, force: bool, held: ExitStack) -> Summary:
        method = self.create_method(spec.method)
        config = self.run_config(spec, method.recorded_config())
        finished = self._finished(run_dir, config, force)
        if finished is not None:
            return finished
        # Everything that can fail on bad input is loaded before the run folder is touched.
        tasks = self.benchmark.sequence(list(spec.tasks))
        data = {t.name: self.task_data(t) for t in tasks}
        backbone = load_backbone(self.model_path())
        ctx = self._context(spec, tasks, data, backbone)
        method.check(ctx)
        finished = self._claim_on_every_rank(run_dir, config, force, held)
        if finished is not None:
            return finished
        if self.world.main:  # for `harness status`: the stages to come, and the error if any
            write_json(run_dir.path / STAGES, method.stages(ctx))
            held.push(partial(self._record_failure, run_dir))
        runlog = held.enter_context(RunLog(run_dir.path, write=self.world.main,
                                           sources=QUIET + method_packages(method)))
        seed_everything(spec.seed)  # after the backbone is in place, whether built or cached
        evaluate = partial(evaluate_task, batcher=ctx.batcher, batch_size=self.profile.eval_batch_size,
                           max_new_tokens=self.profile.max_new_tokens, world=self.world,
                           bf16=self.profile.bf16 and ctx.device.type == "cuda")
        done = self.world.broadcast(run_dir.completed_stages())  # rank 0's view: it writes them
        if not done:  # stage 0: the backbone before any method touches it, the baseline FWT needs
            self._write_base_row(ctx, run_dir, evaluate)
        method.setup(ctx)
        done = self._resume(method, ctx, run_dir, done)
        # The latest row, its predictions (for cells a method carries over) and its metrics.
        last = read_json(done[-1] / "metrics.json") if done else {"accuracy": self._base_row_of(tasks)}
        latest = stage_predictions(done[-1]) if done else \
            {t.name: self._base_row[t.name][1] for t in tasks}
        evaluation = StageEvaluation(evaluate, ctx, method, len(method.stages(ctx)),
                                     self.options.eval_scope, last["accuracy"], latest)
        steps = trained_steps(done)  # the global step the tracker curves go on from
        tracking = held.enter_context(self._tracking(spec, run_dir, steps, config))
        steps = self._train_stages(spec, method, ctx, run_dir, done, evaluation, last, tracking,
                                   steps, runlog)
        summary = finish_run(run_dir, spec, [t.name for t in tasks], config) if self.world.main else None
        if summary is not None and tracking.writers:
            tracking.finish(summary, config, steps)
        return self.world.broadcast(summary)

    @contextmanager
    def _tracking(self, spec: RunSpec, run_dir: RunDir, first_step: int, config: dict):
        """The run's trackers (rank 0), going on from `first_step` (the complete stages')."""
        names = self.options.report_to if self.world.main else ()
        tracking = open_tracking(
            names, run_dir.path, first_step, results=self.options.results,
            run_name=str(run_dir.path.relative_to(self.options.results)),
            mlflow_uri=self.options.mlflow_uri, config=config)
        try:
            yield tracking
        finally:
            tracking.close()

    def _finished(self, run_dir: RunDir, config: dict, force: bool) -> Summary | None:
        """The summary of a complete run of this configuration (to skip it); refuses a folder
        that holds another configuration's run."""
        if run_dir.is_complete() and not force:
            summary = read_summary(run_dir.summary_path)
            if summary.fingerprint != config["fingerprint"]:
                raise HarnessError(
                    f"{run_dir.summary_path}: a complete run of another configuration is here; "
                    "use another --results folder, or --force to replace it")
            log.info("%s: complete, skipped", run_dir.path)
            return summary
        if not force:
            run_dir.check_config(config)
        return None

    def _claim_on_every_rank(self, run_dir: RunDir, config: dict, force: bool,
                             held: ExitStack) -> Summary | None:
        """Rank 0 claims the folder and the others follow it: None to go on, the summary if the
        run was completed meanwhile; RunBusy if another process holds it."""
        status = self._claim(run_dir, config, force, held) if self.world.main else None
        status = self.world.broadcast(status)
        if status == "complete":
            return read_summary(run_dir.summary_path)
        if status is not None:
            raise RunBusy(status)
        self.world.barrier()
        return None

    def _context(self, spec: RunSpec, tasks, data: dict[str, TaskData], backbone) -> Context:
        """The model on this rank's device, with the batcher every hook and evaluation shares."""
        device = device_for(self.world)
        backbone.model.to(device)
        if self.profile.gradient_checkpointing:
            backbone.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        batcher = Batcher(backbone, self.profile.max_source_length, self.profile.max_target_length,
                          device=device, pad_to_multiple_of=self.profile.pad_to_multiple_of)
        return Context(model=backbone.model, backbone=backbone, tasks=tasks, data=data,
                       profile=self.profile, seed=spec.seed, order=spec.order, batcher=batcher,
                       device=device)

    def _base_row_of(self, tasks) -> dict[str, float]:
        return {t.name: self._base_row[t.name][0] for t in tasks}

    def _write_base_row(self, ctx: Context, run_dir: RunDir, evaluate) -> None:
        """Stage 0: every task evaluated on the untouched backbone, once per sweep."""
        start = time.perf_counter()
        reused = all(t.name in self._base_row for t in ctx.tasks)
        for task in ctx.tasks:
            if task.name not in self._base_row:
                self._base_row[task.name] = evaluate(ctx.model, data=ctx.data[task.name])
        if self.world.main:
            run_dir.write_stage(stage_name(0, "base"), {
                "stage": 0, "task": None, "accuracy": self._base_row_of(ctx.tasks),
                "eval_seconds": time.perf_counter() - start, "reused": reused},
                [p for t in ctx.tasks for p in self._base_row[t.name][1]])
        self.world.barrier()

    def _resume(self, method, ctx: Context, run_dir: RunDir, done: list[Path]) -> list[Path]:
        """Rebuild the model and the method's state after the last complete stage that holds a
        checkpoint; stages after it (possible only if folders were removed by hand) are trained
        again. Returns the complete stages kept (the base stage first)."""
        while len(done) > 1 and not (done[-1] / "model.safetensors").exists():
            done.pop()
        if len(done) > 1:
            model_state, method_state = RunDir.load_checkpoint(done[-1])
            method.load_state_dict(method_state, ctx, completed_stages=len(done) - 1)
            missing = set(model_state) - set(ctx.model.state_dict())
            if missing:
                raise HarnessError(f"{done[-1]}: checkpoint tensors do not fit the model "
                                   f"({sorted(missing)[:3]}...)")
            ctx.model.load_state_dict(model_state, strict=False)
            log.info("%s: resuming after stage %d", run_dir.path, len(done) - 1)
        if self.world.main:  # a kill between writing a stage and dropping its predecessor's leaves two
            for older in done[1:-1]:
                RunDir.drop_checkpoint(older)
        return done

    @property
    def shows_progress(self) -> bool:
        return self.options.progress and self.world.main

    def _train_stages(self, spec: RunSpec, method, ctx: Context, run_dir: RunDir, done: list[Path],
                      evaluation: "StageEvaluation", last: dict, tracking: Tracking,
                      steps: int, runlog: RunLog) -> int:
        """The stages after the complete ones (`done`, the base stage first; `last` the latest's
        metrics; `steps` their optimizer steps) in the hook order: before_task, fit, after_task,
        task_deltas, evaluation, write (rank 0). Returns the run's optimizer steps."""
        labels = method.stages(ctx)
        first = max(0, len(done) - 1)
        saved = SavedTensors(ctx.model, last.get("saved_tensors", []))  # the base stage has none
        previous = done[-1] if len(done) > 1 else None
        bar = tqdm(total=len(labels), initial=first, desc=f"{spec.method} {spec.sequence_name} "
                   f"seed{spec.seed}", leave=False, unit="task", disable=not self.shows_progress)
        for stage in range(first, len(labels)):
            ctx.stage = stage
            seed_everything(stage_seed(spec.seed, stage))
            prepare_seconds = timed(method.before_task, ctx)
            saved.note(ctx.model)
            on_step = (lambda k, values, offset=steps: tracking.scalars("train", values, offset + k)) \
                if tracking.writers else None
            checkpoints = StepCheckpoints(run_dir.path, stage, self.profile.checkpoint_every,
                                          partial(saved.tensors, ctx.model), self.world)
            result = fit(ctx, method, ctx.batcher,
                         self.fit_settings(spec, stage, labels[stage], ctx, on_step, checkpoints))
            steps += result.steps
            consolidate_seconds = timed(method.after_task, ctx)
            deltas = method.task_deltas(ctx)
            numbers = method_numbers(method, ctx)
            accuracy, predictions, eval_seconds = evaluation(stage + 1)
            efficiency = stage_efficiency(result.flops, result.seconds, device_peak(ctx.device))
            tracking.scalars("stage", stage_scalars(accuracy, labels[:stage + 1], {
                "prepare_seconds": prepare_seconds, "train_seconds": result.seconds,
                "consolidate_seconds": consolidate_seconds, "eval_seconds": eval_seconds},
                efficiency, numbers), steps)
            if self.world.main:
                metrics = {"stage": stage + 1, "task": labels[stage], "accuracy": accuracy,
                           "train": {**asdict(result), **efficiency, "ranks": self.world.size,
                                     "prepare_seconds": prepare_seconds,
                                     "consolidate_seconds": consolidate_seconds},
                           "eval_seconds": eval_seconds, "saved_tensors": sorted(saved.names),
                           **({"method": numbers} if numbers else {}),
                           **({"warnings": notes} if (notes := runlog.take()) else {})}
                previous = self._write_stage(run_dir, stage_name(stage + 1, labels[stage]), metrics,
                                             predictions, saved.tensors(ctx.model), method, deltas,
                                             previous)
                checkpoints.clear()
                bar.set_postfix({"acc": f"{accuracy[t]:.1f}" for t in [ctx.task.name] if t in accuracy})
            self.world.barrier()
            bar.update(1)
        bar.close()
        return steps

    @staticmethod
    def _write_stage(run_dir: RunDir, name: str, metrics: dict, predictions: list[dict],
                     checkpoint: dict, method, deltas, previous: Path | None) -> Path:
        """A stage's folder, renamed into place; then the previous stage's checkpoint is dropped
        (only the latest is kept). Returns the new stage's folder."""
        stage_dir = run_dir.write_stage(name, metrics, predictions, checkpoint=checkpoint,
                                        method_state=method.state_dict(), deltas=deltas)
        faults.point("stage_done")
        if previous is not None:
            RunDir.drop_checkpoint(previous)
        return stage_dir

    def fit_settings(self, spec: RunSpec, stage: int, label: str, ctx: Context,
                     on_step=None, checkpoints: StepCheckpoints | None = None) -> FitSettings:
        return FitSettings.of_profile(
            self.profile, seed=stage_seed(spec.seed, stage), progress=self.options.progress,
            desc=label, world=self.world, engine_config=self.engine_config,
            autocast=self.profile.bf16 and ctx.device.type == "cuda", on_step=on_step,
            checkpoints=checkpoints)


def method_packages(method: Method) -> tuple[str, ...]:
    """The top-level packages of a method's classes (a modifier's and the method it wraps)."""
    names = []
    while isinstance(method, Method):
        names.append(type(method).__module__.split(".")[0])
        method = getattr(method, "base", None)
    return tuple(dict.fromkeys(names))


def method_numbers(method, ctx: Context) -> dict[str, float]:
    """The method's `stage_metrics`, checked: finite numbers by name."""
    numbers = dict(method.stage_metrics(ctx))
    for key, value in numbers.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise HarnessError(f"method {method.name}: stage_metrics must map names to finite "
                               f"numbers; got {key!r}: {value!r}")
    return numbers


def stage_values(accuracy: dict[str, float], seen: list[str], seconds: dict[str, float]) -> dict:
    """A stage's row for the trackers: each task's accuracy, AA over the tasks seen, timings."""
    seen_values = [accuracy[t] for t in seen if t in accuracy]
    return {**{f"accuracy/{t}": v for t, v in accuracy.items()},
            "AA_seen": sum(seen_values) / len(seen_values) if seen_values else float("nan"),
            **seconds}


def stage_scalars(accuracy: dict[str, float], seen: list[str], seconds: dict[str, float],
                  efficiency: dict, numbers: dict[str, float]) -> dict:
    """What the trackers show of a stage: `stage_values`, the training's TFLOP/s and share of
    the device's peak (harness.efficiency), and the method's numbers."""
    return {**stage_values(accuracy, seen, seconds),
            "train_tflops": efficiency["achieved_flops"] / 1e12,
            "share_of_peak": efficiency["share_of_peak"],
            **{f"method/{k}": v for k, v in numbers.items()}}


def trained_steps(done: list[Path]) -> int:
    """Optimizer steps of the complete trained stages (the base stage first in `done`)."""
    return sum(read_json(d / "metrics.json").get("train", {}).get("steps", 0) for d in done[1:])


def timed(hook, ctx: Context) -> float:
    start = time.perf_counter()
    hook(ctx)
    return time.perf_counter() - start


class SavedTensors:
    """The tensors a stage checkpoint holds: every one that ever trained, or that was created after
    the run's model was built and resumed (new branches, designed projections), frozen or not; the
    rest is the backbone, rebuilt from its files."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.existing = {id(p) for p in model.parameters()}
        self.names = set(names)

    def note(self, model: torch.nn.Module) -> None:
        self.names |= {n for n, p in model.named_parameters()
                       if p.requires_grad or id(p) not in self.existing}

    def tensors(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        return {n: params[n] for n in sorted(self.names)}


class StageEvaluation:
    """Evaluation after each stage: every task (scope "all"); under "seen+next", after a stage
    before the last, only the tasks seen so far and the next one (what LA, BWT, forgetting and FWT
    read); under "last", after a stage before the last, none (AA alone: what tuning scores). The
    base row and the last row stay whole. A task the method evaluates with unchanged weights
    (`evaluates_as_before`) carries over its previous cell and predictions instead of generating
    them again."""

    def __init__(self, evaluate, ctx: Context, method, n_stages: int, scope: str,
                 row: dict[str, float], predictions: dict[str, list[dict]]):
        self.evaluate, self.ctx, self.method = evaluate, ctx, method
        self.n_stages, self.narrowed = n_stages, scope
        self.row, self.latest = dict(row), dict(predictions)  # the previous row, by task

    def scope(self, stage: int) -> tuple[Task, ...]:
        tasks = self.ctx.tasks
        if not 0 < stage < self.n_stages or self.narrowed == "all":
            return tasks
        return tasks[:stage + 1] if self.narrowed == "seen+next" else ()

    def __call__(self, stage: int) -> tuple[dict[str, float], list[dict], float]:
        """The row after `stage` stages: accuracy by task, the prediction records, the seconds."""
        start = time.perf_counter()
        accuracy, predictions = {}, []
        was_training = self.ctx.model.training
        self.ctx.model.eval()  # once for the row, not once per task (a switch walks every module)
        for task in self.scope(stage):
            if (task.name in self.row and task.name in self.latest
                    and self.method.evaluates_as_before(self.ctx, task)):
                acc, preds = self.row[task.name], self.latest[task.name]
            else:
                self.method.select_for_eval(self.ctx, task)
                acc, preds = self.evaluate(self.ctx.model, data=self.ctx.data[task.name])
            accuracy[task.name] = acc
            predictions += preds
            self.latest[task.name] = preds
        self.method.select_for_eval(self.ctx, None)
        self.ctx.model.train(was_training)
        self.row = accuracy
        return accuracy, predictions, time.perf_counter() - start


def runner_for(profile_name: str, options: Options, world: World = SINGLE) -> Runner:
    return Runner(load_profile(profile_name, options.profile_overrides), options, world)
