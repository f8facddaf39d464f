"""The contract every method plugin keeps, checked on any registered method (as scikit-learn's
`check_estimator` checks an estimator): `harness check-method NAME`, or `check_method` in a test.

Each check runs the method on the embedded default over three synthetic tasks, in this process
(a kill is simulated by `harness.faults` raising where a SIGKILL would land), except `two_ranks`,
which launches DeepSpeed. A modifier is checked on top of `seqlora`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from harness import efficiency, faults
from harness.errors import HarnessError
from harness.store import RunDir, RunSpec
from harness.testing.kit import make_context, prepared_run, synthetic_benchmark, train_stage
from harness_methods import registry
from harness_methods.base import Method, SettingError
from harness_methods.modifier import Modifier

TASKS = ("agnews", "SST-2", "CB")
TRAIN, TEST = 16, 8                # one step per epoch at batch 16: three per stage
EVERY_STEP = ("train.checkpoint_every=1",)
# Not results: timings, and whether the base row was evaluated by this run or shared in a sweep.
# Warnings are left out too: one that `setup` or `load_state_dict` logs lands in another stage's
# record when a run resumes.
TIMINGS = {"seconds", "train_seconds", "eval_seconds", "train_eval_seconds", "prepare_seconds",
           "consolidate_seconds", "reused", "files", "warnings", *efficiency.RECORDED}


@dataclass
class CheckResult:
    check: str
    passed: bool | None          # None: not applicable here (skipped)
    detail: str = ""

    def line(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "skip"}[self.passed]
        return f"{mark}  {self.check:22s} {self.detail}"


class ContractError(AssertionError):
    """A check that failed: what the method did against what the contract asks."""


def runnable_name(name: str) -> str:
    """A modifier is checked wrapped around SeqLoRA; any other name as it is. An unknown name is
    bad input (HarnessError); a plugin that fails to load is left to the `registered` check."""
    base = name.split("+")[0]
    if base not in registry.available():
        registry.method_class(base)  # raises: unknown, with the known names listed
    try:
        cls = registry.method_class(base)
    except Exception:
        return name
    return f"seqlora+{name}" if issubclass(cls, Modifier) else name


# -- what a run leaves, compared -------------------------------------------------------------------
def untimed(record: Any) -> Any:
    if isinstance(record, dict):
        return {k: untimed(v) for k, v in record.items() if k not in TIMINGS}
    return record


def outcome(run_dir: RunDir) -> dict[str, Any]:
    """What must not depend on how often a run was interrupted: the summary and every stage's
    record without timings, predictions, the accuracy matrix, the final model and method state."""
    stages = run_dir.stage_folders()
    model, state = RunDir.load_checkpoint(stages[-1])
    return {"summary": untimed(json.loads(run_dir.summary_path.read_text())),
            "stages": {d.name: untimed(json.loads((d / "metrics.json").read_text())) for d in stages},
            "predictions": {d.name: (d / "predictions.jsonl").read_text() for d in stages},
            "matrix": (run_dir.path / "accuracy_matrix.csv").read_text(),
            "model": model, "method_state": state}


def differences(found: Any, expected: Any, where: str = "") -> list[str]:
    """Where two outcomes differ (tensors compared bitwise); empty when they are the same."""
    if isinstance(expected, torch.Tensor):
        same = isinstance(found, torch.Tensor) and found.shape == expected.shape and \
            found.dtype == expected.dtype and torch.equal(found, expected)
        return [] if same else [where]
    if isinstance(expected, dict) and isinstance(found, dict):
        keys = sorted(set(found) | set(expected), key=str)
        return [d for k in keys for d in differences(found.get(k), expected.get(k), f"{where}/{k}")]
    return [] if found == expected else [where]


def assert_same(found: dict, expected: dict, what: str) -> None:
    diff = differences(found, expected)
    if diff:
        raise ContractError(f"{what}: differs in {', '.join(diff[:4])}"
                            f"{f' and {len(diff) - 4} more' if len(diff) > 4 else ''}")


# -- the checks ----------------------------------------------------------------------------------
class Trial:
    """One method under check: its scratch folder, data and the reference run they share."""

    def __init__(self, name: str, workdir: Path, data_dir: Path):
        self.name, self.workdir, self.data_dir = name, workdir, data_dir
        self._reference: RunDir | Exception | None = None

    def run(self, label: str, settings: tuple[str, ...] = EVERY_STEP, runner_hook=None) -> RunDir:
        runner, spec = prepared_run(self.name, self.data_dir, self.workdir / label, TASKS, TRAIN,
                                    TEST, 0, settings, "default")
        if runner_hook is not None:
            runner_hook(runner)
        runner.run(spec)
        return runner.run_dir(spec)

    @property
    def reference(self) -> RunDir:
        """The uninterrupted run the other checks compare with (made once; a failure is kept)."""
        if self._reference is None:
            try:
                self._reference = self.run("reference")
            except Exception as exc:
                self._reference = exc
        if isinstance(self._reference, Exception):
            raise ContractError(f"the uninterrupted run failed: {type(self._reference).__name__}: "
                                f"{self._reference}")
        return self._reference

    def killed_then_resumed(self, label: str, kill: str, left: Callable[[RunDir], bool]) -> RunDir:
        """The run killed at `kill`, then run again; `left(run_dir)` must hold after the kill (the
        checkpoint it resumes from is there), so that a run that starts over does not pass."""
        with faults.kill_at(f"{kill}:RAISE"):
            try:
                self.run(label)
            except faults.Killed:
                pass
            else:
                raise ContractError(f"the run was never at {kill}")
        spec = RunSpec(self.name, TASKS, 0, "default")
        if not left(RunDir(spec.folder(self.workdir / label))):
            raise ContractError(f"killed at {kill}, the run left no checkpoint to resume from")
        return self.run(label)


def check_registered(trial: Trial) -> str:
    """The entry point loads a Method subclass whose config file is found and read."""
    method = registry.create(trial.name, "default")
    cls = type(method)
    return f"{cls.__module__}.{cls.__qualname__}, {len(method.config)} setting(s) for the default profile"


def wrong_value(value: Any) -> Any:
    """A value of another type than `value`: what a typo in a config file gives."""
    if isinstance(value, bool):
        return "not-a-flag"
    if isinstance(value, list):
        return [12345]  # a list whose entries have no type a list setting holds
    if isinstance(value, (int, float, dict)):
        return "not-a-" + {int: "number", float: "number", dict: "table"}[type(value)]
    return 12345


def check_settings(trial: Trial) -> str:
    """Every setting is read and checked in `__init__`: a value of the wrong type is refused there
    (a SettingError naming it), so that `run` stops before anything is written."""
    base_name, *modifiers = trial.name.split("+")
    parts = [(base_name, None)] + [(m, base_name) for m in modifiers]
    checked = 0
    for name, wrapped in parts:
        cls = registry.method_class(name)
        config = registry.method_config(name, "default", cls)
        for key, value in config.items():
            bad = {**config, key: wrong_value(value)}
            try:
                cls(bad) if wrapped is None else cls(registry.create(wrapped, "default"), bad)
            except SettingError as exc:
                if exc.key.split(".")[0] != key:
                    raise ContractError(f"{name}: {key} = {bad[key]!r} refused as a bad {exc.key}")
            else:
                raise ContractError(f"{name}: {key} = {bad[key]!r} accepted by __init__ (read and "
                                    "check every setting there, e.g. with self.number/choice/flag)")
            checked += 1
    first = next(iter(registry.method_config(base_name, "default")), None)
    if first is not None:  # end to end: `run --set` refused before the results folder exists
        value = wrong_value(registry.method_config(base_name, "default")[first])
        results = trial.workdir / "refused"
        try:
            trial.run("refused", (f"method.{first}={json.dumps(value)}",))
        except HarnessError:
            pass
        else:
            raise ContractError(f"run --set method.{first}={value!r} was not refused")
        if results.exists():
            raise ContractError(f"a refused run wrote {results}")
    return f"{checked} setting(s) refused when of the wrong type"


def check_state_dict(trial: Trial) -> str:
    """After each stage, `state_dict` survives the results store (flat tensors and JSON values, no
    pickling) and `load_state_dict` on a fresh method and model rebuilds the same state."""
    ctx, method, batcher = make_context(trial.data_dir, trial.name, tasks=TASKS[:2])
    method.setup(ctx)
    for stage in range(len(method.stages(ctx))):
        train_stage(ctx, method, batcher, stage)
        state = method.state_dict()
        store = RunDir(trial.workdir / "state_dict" / f"stage{stage}")
        store.path.mkdir(parents=True, exist_ok=True)
        try:
            folder = store.write_stage(f"stage_{stage:02d}", {}, [], checkpoint={},
                                       method_state=state)
        except (TypeError, ValueError) as exc:
            raise ContractError(f"state_dict after stage {stage + 1} cannot be stored: {exc} "
                                "(tensors and JSON values at its top level only)") from None
        _, stored = RunDir.load_checkpoint(folder)
        fresh_ctx, fresh, _ = make_context(trial.data_dir, trial.name, tasks=TASKS[:2])
        fresh.setup(fresh_ctx)
        fresh.load_state_dict(stored, fresh_ctx, completed_stages=stage + 1)
        # as a resumed run, which loads the stage's model tensors next
        fresh_ctx.model.load_state_dict(ctx.model.state_dict(), strict=False)
        assert_same(as_stored(fresh.state_dict()), stored,
                    f"state_dict after stage {stage + 1}, stored, loaded into a fresh method")
    return f"{len(state)} entr{'y' if len(state) == 1 else 'ies'} after the last stage"


def as_stored(state: dict[str, Any]) -> dict[str, Any]:
    """A method state as the results store gives it back: tensors as they are, the rest through
    JSON (tuples become lists, keys strings)."""
    plain = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return {**json.loads(json.dumps(plain)),
            **{k: v for k, v in state.items() if isinstance(v, torch.Tensor)}}


def check_task_deltas(trial: Trial) -> str:
    """`task_deltas` are keyed `<module>::A|B|W` for modules of the model, with A (k x d_in),
    B (d_out x k) pairs and W (d_out x d_in), finite."""
    ctx, method, batcher = make_context(trial.data_dir, trial.name, tasks=TASKS[:2])
    method.setup(ctx)
    train_stage(ctx, method, batcher, 0)
    deltas = method.task_deltas(ctx)
    modules = dict(ctx.model.named_modules())
    for key, tensor in deltas.items():
        module_name, _, part = key.rpartition("::")
        found = [m for n, m in modules.items()  # a name inside a wrapper (peft's) counts
                 if n == module_name or n.endswith(f".{module_name}")]
        if len(found) != 1 or part not in ("A", "B", "W"):
            raise ContractError(f"task_deltas key {key!r} is no `<module>::A|B|W` of one module "
                                f"of the model ({len(found)} match)")
        module = found[0]
        weight = getattr(module, "weight", None)
        d_out, d_in = weight.shape if weight is not None else (None, None)
        k = deltas.get(f"{module_name}::A", tensor).shape[0]
        expected = {"A": (k, d_in), "B": (d_out, k), "W": (d_out, d_in)}[part]
        if tuple(tensor.shape) != expected:
            raise ContractError(f"task_deltas {key}: shape {tuple(tensor.shape)}, expected {expected}")
        if not torch.isfinite(tensor).all():
            raise ContractError(f"task_deltas {key}: not finite")
        if part in "AB" and f"{module_name}::{'B' if part == 'A' else 'A'}" not in deltas:
            raise ContractError(f"task_deltas {key}: its other factor is missing")
    return f"{len(deltas)} tensor(s)" if deltas else "none (the parameter metrics skip the method)"


def check_determinism(trial: Trial) -> str:
    """Two runs with the same seed and threads, the second in a process of its own under another
    hash seed (state kept on a class, or an order that follows `hash`, then differs): the same
    records, predictions and bitwise the same tensors."""
    (again,) = runs_in_another_process([trial.name], trial.workdir / "again", trial.data_dir)
    assert_same(outcome(again), outcome(trial.reference), "a second run, same seed, another process")
    return "same records, predictions and tensors, in another process"


def runs_in_another_process(names: list[str], results: Path, data_dir: Path) -> list[RunDir]:
    """The determinism check's second runs of `names` (as `Trial.run` makes them), one after
    another in one process under another hash seed: a process start costs seconds, so a suite
    that checks many methods starts one."""
    hash_seed = str(int(os.environ.get("PYTHONHASHSEED", "0") or 0) + 1)
    return launch(names, results, data_dir, TASKS, TRAIN, ("--set", EVERY_STEP[0]),
                  {"PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": str(torch.get_num_threads())})


def check_resume_between_stages(trial: Trial) -> str:
    """Killed once a stage is in place (its predecessor's checkpoint not yet dropped), then run
    again: it resumes from that stage and ends as the uninterrupted run, bitwise."""
    stages = len(trial.reference.stage_folders()) - 1
    at = min(2, stages)
    resumed = trial.killed_then_resumed("killed-between", f"stage_done:{at}",
                                        lambda rd: len(rd.completed_stages()) == at + 1)
    assert_same(outcome(resumed), outcome(trial.reference), f"resumed after stage {at}")
    return f"killed after stage {at} of {stages}"


def check_resume_inside_stage(trial: Trial) -> str:
    """Killed in the middle of the last stage (a step checkpoint after every step), then run
    again: it resumes at the step it reached and ends as the uninterrupted run, bitwise."""
    steps = [json.loads((d / "metrics.json").read_text())["train"]["steps"]
             for d in trial.reference.stage_folders()[1:]]
    if steps[-1] < 2:
        return None  # one step: nothing inside the stage to resume
    at = sum(steps[:-1]) + 2
    resumed = trial.killed_then_resumed("killed-inside", f"train_step:{at}",
                                        lambda rd: any((rd.path / "checkpoints").glob("*")))
    assert_same(outcome(resumed), outcome(trial.reference), f"resumed inside the last stage")
    return f"killed at step {at} of {sum(steps)}, resumed after step {at - 1}"


def overrides(method: Method, hook: str) -> bool:
    """Whether the method (or, for a modifier, the method it wraps) defines `hook` itself."""
    while isinstance(method, Modifier):
        if getattr(type(method), hook) is not getattr(Modifier, hook):
            return True
        method = method.base
    return getattr(type(method), hook) is not getattr(Method, hook)


def check_evaluation(trial: Trial) -> str | None:
    """Cells the method says are evaluated as before (`evaluates_as_before`) are carried over;
    evaluating them afresh, after `select_for_eval`, must give the same predictions."""
    if not overrides(registry.create(trial.name, "default"), "evaluates_as_before"):
        return None

    def afresh(runner) -> None:
        create = runner.create_method

        def create_method(name):
            method = create(name)
            method.evaluates_as_before = lambda ctx, task: False
            return method
        runner.create_method = create_method

    fresh = trial.run("evaluated-afresh", runner_hook=afresh)
    found, expected = outcome(fresh), outcome(trial.reference)
    assert_same({k: found[k] for k in ("predictions", "matrix")},
                {k: expected[k] for k in ("predictions", "matrix")}, "every cell evaluated afresh")
    return "carried-over cells equal their fresh evaluation"


def check_two_ranks(trial: Trial) -> str | None:
    """Under DeepSpeed, two CPU ranks compute bitwise what one process computes with the same
    global batch (batch 16 x 2 ranks against 16 x accumulation 2), at the method's highest ZeRO
    stage (up to 2)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return None
    method = registry.create(trial.name, "default")
    zero = min(method.max_zero_stage, 2)
    # 40 training examples, so that each epoch ends with a smaller step; one thread, as every
    # DeepSpeed rank has
    tasks, one_thread = TASKS[:2], {"OMP_NUM_THREADS": "1"}
    (two,) = launch([trial.name], trial.workdir / "two-ranks", trial.data_dir, tasks, 40,
                    ("--launcher", "deepspeed", "--num-gpus", "2", "--deepspeed-config", f"zero{zero}"),
                    one_thread)
    (one,) = launch([trial.name], trial.workdir / "one-process", trial.data_dir, tasks, 40,
                    ("--set", "train.grad_accum=2"), one_thread)
    found, expected = outcome(two), outcome(one)
    assert_same({k: found[k] for k in ("matrix", "model")},
                {k: expected[k] for k in ("matrix", "model")}, f"two ranks under ZeRO-{zero}")
    return f"ZeRO-{zero}: same accuracy matrix and bitwise the same tensors"


def launch(names: list[str], results: Path, data_dir: Path, tasks: tuple[str, ...], train: int,
           extra: tuple[str, ...], env: dict[str, str], timeout: float = 600) -> list[RunDir]:
    """`harness run` of the methods `names`, one after another in a process of its own (`env`
    added to this one's); their run folders, in order."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **env}
    done = subprocess.run(
        [sys.executable, "-m", "harness", "run", "--all", "--jobs", "1", "--methods", ",".join(names),
         "--tasks", ",".join(tasks), "--data-dir", str(data_dir), "--results", str(results),
         "--train-per-task", str(train), "--test-per-task", str(TEST), "--no-progress", *extra],
        env=env, capture_output=True, text=True, timeout=timeout * len(names), start_new_session=True)
    if done.returncode != 0:
        raise ContractError(f"{results.name}: harness run failed:\n{done.stderr[-2000:]}")
    return [RunDir(RunSpec(name, tasks, 0, "default").folder(results)) for name in names]


CHECKS: dict[str, Callable[[Trial], str | None]] = {
    "registered": check_registered,
    "settings": check_settings,
    "state_dict": check_state_dict,
    "task_deltas": check_task_deltas,
    "determinism": check_determinism,
    "resume_between_stages": check_resume_between_stages,
    "resume_inside_stage": check_resume_inside_stage,
    "evaluation": check_evaluation,
    "two_ranks": check_two_ranks,
}


def check_method(name: str, skip: tuple[str, ...] = (), workdir: Path | None = None,
                 data_dir: Path | None = None, report: Callable[[CheckResult], None] | None = None
                 ) -> list[CheckResult]:
    """Every check of the contract (but those in `skip`) on method `name`; one result each, in
    order. After a failed `registered` check nothing else runs."""
    unknown = sorted(set(skip) - set(CHECKS))
    if unknown:
        raise HarnessError(f"--skip {unknown[0]}: no such check (checks: {', '.join(CHECKS)})")
    name = runnable_name(name)  # unknown names fail here, with the known ones listed
    if workdir is not None and Path(workdir).exists() and \
            (not Path(workdir).is_dir() or any(Path(workdir).iterdir())):
        raise HarnessError(f"--keep {workdir}: not an empty folder (runs found there would be "
                           "taken as done, and the checks would compare nothing)")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per loaded model would bury the results
    for planted in ("HARNESS_KILL_AT", "HARNESS_KILL_ONCE"):  # the checks place their own kills
        os.environ.pop(planted, None)
    with tempfile.TemporaryDirectory(prefix="harness-check-") as scratch:
        workdir = Path(workdir or scratch)
        data_dir = Path(data_dir) if data_dir else synthetic_benchmark(workdir / "data", 40, 8)
        trial, results = Trial(name, workdir, data_dir), []
        for check, function in CHECKS.items():
            if check in skip:
                result = CheckResult(check, None, "skipped (--skip)")
            else:
                result = run_check(check, function, trial)
            results.append(result)
            if report is not None:
                report(result)
            if check == "registered" and result.passed is False:
                break
    return results


def run_check(check: str, function, trial: Trial) -> CheckResult:
    try:
        detail = function(trial)
    except ContractError as exc:
        return CheckResult(check, False, str(exc))
    except faults.Killed:
        raise
    except Exception as exc:  # a hook that raised: the contract's answer is that it failed
        return CheckResult(check, False, f"{type(exc).__name__}: {exc}")
    if detail is None:
        return CheckResult(check, None, "not applicable")
    return CheckResult(check, True, detail)


def assert_method_passes(name: str, skip: tuple[str, ...] = ("two_ranks",), **kwargs) -> None:
    """For a plugin's own tests: fail with every failed check's message."""
    failed = [r for r in check_method(name, skip, **kwargs) if r.passed is False]
    if failed:
        raise AssertionError("\n".join(r.line() for r in failed))
