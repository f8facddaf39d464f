"""Equal-budget selection of each method's settings on a split carved from train.json.

`harness tune` searches, for every method, the learning rate and the method's main coefficient
(`Method.search_space`) with Optuna's TPE sampler: the same number of trials, the same training
budget and the same sequences for every method, each trial a whole run scored by its AA on the
held-out split (`--eval-split heldout`), never on the test split. A study's first trial is the
method's own settings (its config file), so the choice is never worse on that split than not
tuning. The studies live in an Optuna storage (SQLite by default), so several processes or
machines can share one study. The chosen settings go to `tuned.json`, which `run --tuned FILE`
applies and every run's config records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.store import RunSpec, write_atomic

TUNED_FILE = "tuned.json"
CHOICES_FILE = "tuned.md"
STORAGE_ATTEMPTS = 3
HEARTBEAT_S, GRACE_S = 60, 600  # a paused process's trial is given up only after 10 minutes


def search_space(name: str, profile: str, lr_range: tuple[float, float],
                 ranges: dict[str, tuple[float, float]] | None = None) -> dict[str, tuple[float, float]]:
    """The learning rate (the same range for every method) and the method's own coefficient; of
    the base method for a combination such as olora+sam (`--set method.*` reaches the base).
    `ranges` (`--range KEY=LOW,HIGH`) replaces a key's range; LOW = HIGH pins it."""
    from harness_methods import registry

    method = registry.create(base_method(name), profile)
    space = {"lr": lr_range} if "lr" in method.config else {}
    space.update(type(method).search_space)
    if not space:
        raise HarnessError(f"tune: method {name!r} has no learning rate and no "
                           "search_space: nothing to tune")
    for key, bounds in (ranges or {}).items():
        if key not in space:
            raise HarnessError(f"--range {key}: {name} searches {', '.join(sorted(space))}, "
                               f"not {key}")
        if all(isinstance(b, int) for b in space[key]):  # a count keeps its type
            if not all(float(b).is_integer() for b in bounds):
                raise HarnessError(f"--range {key}: {name} takes whole numbers for {key}; got "
                                   f"{bounds[0]:g},{bounds[1]:g}")
            bounds = (int(bounds[0]), int(bounds[1]))
        space[key] = bounds
    return space


def suggest(trial, key: str, low: float, high: float) -> float | int:
    """A log-uniform draw in [low, high]; an integer one when both bounds are integers (a memory
    size, a count)."""
    if isinstance(low, int) and isinstance(high, int):
        return trial.suggest_int(key, low, high, log=True)
    if low == high:  # pinned by --range: recorded with the trial, not searched
        return trial.suggest_float(key, low, high)
    return trial.suggest_float(key, low, high, log=True)


def config_trial(name: str, profile: str, space: dict[str, tuple[float, float]],
                 overrides: tuple[str, ...] = ()) -> dict[str, float | int]:
    """The method's own values of the searched settings (its config file for `profile`, with
    `--set method.*`), those within their ranges; a key outside its range is left to the sampler."""
    from harness_methods import registry

    config = registry.create(base_method(name), profile, overrides).config
    own = {}
    for key, (low, high) in space.items():
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(low, int) and isinstance(high, int) and not isinstance(value, int):
            continue
        if low <= value <= high:
            own[key] = value
    return own


@contextmanager
def _quiet_experimental(optuna):
    """Optuna's retry of killed trials is marked experimental (since 2.8): not a user's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def base_method(name: str) -> str:
    return name.split("+")[0]


def open_storage(url: str):
    """The Optuna storage at `url` (created if new), or a one-line error naming it."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            # Live trials beat every HEARTBEAT_S; one silent for GRACE_S (its process killed, its
            # job ended) is marked failed and queued again with its settings, and its rerun
            # resumes the killed run from its folder (`trial_folder`).
            with _quiet_experimental(optuna):
                storage = optuna.storages.get_storage(optuna.storages.RDBStorage(
                    url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback()))
            break
        except (IntegrityError, OperationalError) as exc:
            # Processes starting together on a new database race to create its tables (optuna
            # issue 1092); the losers find them made on a second try.
            if attempt + 1 == STORAGE_ATTEMPTS:
                raise HarnessError(f"--storage {url}: {str(exc).splitlines()[0]}") from None
            time.sleep(1.0)
        except (ValueError, ImportError, SQLAlchemyError) as exc:  # a bad URL, an unusable database
            raise HarnessError(f"--storage {url}: {str(exc).splitlines()[0]}") from None
    storage.url = url  # for messages
    return storage


def tune_method(runner, name: str, sequences: list[tuple[int | None, tuple[str, ...]]],
                setup: dict[str, Any], storage, out: Path) -> dict[str, Any]:
    """Run (or finish, in a shared study) `setup["trials"]` trials for one method; the best of the
    first that many complete trials, by held-out AA averaged over the sequences."""
    import optuna

    ranges = {k: tuple(v) for k, v in setup.get("ranges", {}).items()}
    space = search_space(name, setup["profile"], tuple(setup["lr_range"]), ranges)
    study = optuna.create_study(study_name=f"{setup['profile']}/{name}", storage=storage,
                                direction="maximize", load_if_exists=True)
    _check_setup(study, setup, storage.url)
    options = runner.options
    own = config_trial(name, setup["profile"], space, options.method_overrides)
    if own and not study.trials:  # a new study starts from the method's own settings (once,
        # should several processes start it together)
        study.enqueue_trial(own, user_attrs={"config_file": True}, skip_if_exists=True)

    def objective(trial) -> float:
        settings = {k: suggest(trial, k, low, high) for k, (low, high) in space.items()}
        folder = trial_folder(out, name, trial)
        runner.options = dataclasses.replace(options, results=folder, tuned={name: settings})
        start = time.perf_counter()
        try:
            summaries = [runner.run(RunSpec(method=name, tasks=seq, seed=setup["seed"],
                                            profile=setup["profile"], order=order))
                         for order, seq in sequences]
        finally:
            runner.options = options
        values = [s.metrics.get("AA") for s in summaries]
        score = math.nan if None in values else sum(values) / len(values)
        shown = "  ".join(f"{k} {v:.3g}" for k, v in settings.items())
        own = "  (config file)" if trial.user_attrs.get("config_file") else ""
        count = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) + 1
        print(f"{name:10s} {count:3d}/{setup['trials']} ({folder.name})  {shown}  held-out AA "
              f"{score:.2f}  ({time.perf_counter() - start:.1f}s){own}", flush=True)
        return score

    done = optuna.trial.TrialState.COMPLETE
    table = out / "trials" / f"{name}.csv"
    write_trials(table, study)  # what there is already, also when nothing is left to run
    while len(study.get_trials(states=(done,))) < setup["trials"]:  # others may share the study
        # A sampler seeded per trial: one process repeats itself exactly, and processes sharing
        # the study do not all draw the same first (random) trials, as one seed each would.
        # Half the trials explore at random (the config file's first), the rest follow TPE (its
        # default waits for 10).
        study.sampler = optuna.samplers.TPESampler(seed=setup["seed"] * 10007 + len(study.trials),
                                                   n_startup_trials=max(1, setup["trials"] // 2))
        study.optimize(objective, n_trials=1)
        write_trials(table, study)  # as it goes, for long tunings
    return _best_of_budget(study, setup["trials"], name)


def write_trials(path: Path, study) -> None:
    """Every trial of a method's study, one row each (its number, state, settings, held-out AA,
    times, whether it was the config file's): Optuna's own table, for pandas. None before the
    first trial."""
    import optuna
    import pandas as pd

    if not study.trials:
        return
    frame = study.trials_dataframe(attrs=("number", "state", "params", "value", "datetime_start",
                                          "duration", "user_attrs"))
    frame["duration"] = pd.to_timedelta(frame["duration"]).dt.total_seconds()  # None: not run yet
    # A queued trial (the config file's) holds its settings apart from the params of one that ran.
    for trial in study.get_trials(states=(optuna.trial.TrialState.WAITING,)):
        for key, value in trial.system_attrs.get("fixed_params", {}).items():
            frame.loc[trial.number, f"params_{key}"] = value
    own = frame.pop("user_attrs_config_file") if "user_attrs_config_file" in frame else None
    frame["config_file"] = own.eq(True) if own is not None else False
    frame = frame.rename(columns={"value": "heldout_AA", "duration": "seconds"})
    write_atomic(path, frame.to_csv(index=False))


def trial_folder(out: Path, name: str, trial) -> Path:
    """Where a trial's runs go: a rerun of a killed trial goes on in the first attempt's folder,
    so that its runs resume from their checkpoints instead of starting over."""
    frozen = trial.study.get_trials(deepcopy=False)[trial.number]  # numbered from 0 in order
    return out / "trials" / name / f"trial{first_attempt(frozen):03d}"


def first_attempt(trial) -> int:
    """The number of a (frozen) trial's first attempt: its own, unless it reruns a killed one."""
    import optuna

    with _quiet_experimental(optuna):
        first = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.number if first is None else first


def _best_of_budget(study, trials: int, name: str) -> dict[str, Any]:
    """The best of the study's first `trials` complete trials (by number): its settings, held-out
    AA, trial (its folder's number; a killed and rerun trial keeps its first folder), rank among
    the complete trials (1 is the config file's), and how many were compared."""
    import optuna

    done = optuna.trial.TrialState.COMPLETE
    first = sorted(study.get_trials(states=(done,)), key=lambda t: t.number)[:trials]
    scored = [t for t in first if not math.isnan(t.value)]
    if not scored:
        raise HarnessError(f"tune: every trial of {name} ended without an AA")
    best = max(scored, key=lambda t: t.value)
    result = {"settings": best.params, "heldout_AA": round(best.value, 4),
              "trial": first_attempt(best), "rank": first.index(best) + 1, "trials": len(first)}
    own = [t for t in scored if t.user_attrs.get("config_file")]
    if own:  # what not tuning would have scored, beside the choice
        result["config_file"] = {"settings": own[0].params, "heldout_AA": round(own[0].value, 4)}
    return result


def choices_table(data: dict[str, Any]) -> str:
    """What a tuning (tuned.json's content) chose for each method, beside the config file's
    settings (the study's first trial) and the held-out AA of both, as Markdown."""
    import pandas as pd

    from harness.table import render

    def shown(settings: dict | None) -> str:
        return " / ".join(f"{k} {v:.3g}" for k, v in sorted(settings.items())) if settings else \
            "outside the searched ranges"

    rows = {name: {"config file": shown(r.get("config_file", {}).get("settings")),
                   "held-out AA (config file)": r.get("config_file", {}).get("heldout_AA"),
                   "chosen": shown(r["settings"]), "held-out AA (chosen)": r["heldout_AA"],
                   "chosen trial": chosen_trial(r)}
            for name, r in sorted(data["methods"].items())}
    setup = data["setup"]
    title = (f"What `harness tune` chose ({setup['profile']}; {setup['trials']} trials per method, "
             f"scored on the held-out split; learning rate in {setup['lr_range']})")
    return render(pd.DataFrame.from_dict(rows, orient="index").rename_axis("method"), "github",
                  title, "config file: trial 1, the config file's settings (one outside its "
                  "searched range drawn instead); a choice equal to them: no trial beat them.") \
        + "\n"


def chosen_trial(result: dict[str, Any]) -> str:
    """Which complete trial was chosen ("3 of 4"), and its folder where a killed trial's rerun
    makes the two differ (files from before ranks were recorded: the folder's number)."""
    rank = result.get("rank", result["trial"] + 1)
    folder = f" (trial{result['trial']:03d})" if rank != result["trial"] + 1 else ""
    return f"{rank} of {result['trials']}{folder}"


def _check_setup(study, setup: dict[str, Any], url: str) -> None:
    """A shared study only continues the same tuning: same budget, data and search."""
    recorded = study.user_attrs.get("setup")
    if recorded is None:
        study.set_user_attr("setup", setup)
    elif changed := setup_changes(recorded, setup):
        raise HarnessError(f"--storage {url}: study {study.study_name!r} was tuned with other "
                           f"settings ({', '.join(changed)}); use another --out or --storage")


def setup_changes(recorded: dict[str, Any], setup: dict[str, Any]) -> list[str]:
    """What differs between two tunings' setups. The data is compared by its digest where both
    have one (the folder may lie elsewhere on another machine), else by its folder (a setup
    recorded before digests were)."""
    ignored = {"data_dir"} if "data" in recorded and "data" in setup else {"data"}
    return sorted(k for k in {*recorded, *setup} - ignored if recorded.get(k) != setup.get(k))


def write_tuned(path: Path, setup: dict[str, Any], method: str, result: dict[str, Any]) -> None:
    """Add one method's result to `path`, which holds one setup's results for every method, and
    rewrite the table of them beside it (CHOICES_FILE). Processes sharing the folder take turns:
    each reads what the others wrote."""
    from filelock import FileLock

    with FileLock(path.with_name(f".{path.name}.lock")):
        data = read_tuned_file(path) if path.exists() else {"setup": setup, "methods": {}}
        if setup_changes(data["setup"], setup):
            raise HarnessError(f"{path}: holds a tuning with other settings; use another --out")
        data["methods"][method] = result
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
        write_atomic(path.with_name(CHOICES_FILE), choices_table(data))


def read_tuned_file(path: Path, name: str = "") -> dict[str, Any]:
    """The tuning in `path`, checked; errors name it as `name` (the argument that gave it)."""
    name = name or str(path)
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise HarnessError(f"{name}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise HarnessError(f"{name}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not _is_tuned(data):
        raise HarnessError(f"{name}: not a file `harness tune` wrote (it needs \"setup\" and "
                           "\"methods\" -> name -> \"settings\" -> numbers)")
    return data


def _is_tuned(data: Any) -> bool:
    if not isinstance(data, dict) or not isinstance(data.get("setup"), dict):
        return False
    methods = data.get("methods")
    return isinstance(methods, dict) and all(
        isinstance(m, dict) and isinstance(m.get("settings"), dict)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in m["settings"].values())
        for m in methods.values())


def tuned_settings(path: Path, profile: str, methods: list[str]) -> dict[str, dict[str, float]]:
    """`run --tuned FILE`: each method's chosen settings, refused unless the file was tuned for
    this profile, holds every method of the sweep and names only settings the method has."""
    from harness_methods import registry

    data = read_tuned_file(path, f"--tuned {path}")
    if data["setup"].get("profile") != profile:
        raise HarnessError(f"--tuned {path}: tuned for profile {data['setup'].get('profile')!r}, "
                           f"not {profile!r}")
    missing = [m for m in methods if m not in data["methods"]]
    if missing:
        raise HarnessError(f"--tuned {path}: no tuned settings for {', '.join(missing)} (it has "
                           f"{', '.join(sorted(data['methods'])) or 'none'}); run `harness tune` "
                           "for them")
    chosen = {m: data["methods"][m]["settings"] for m in methods}
    for name, settings in chosen.items():
        unknown = sorted(set(settings) - set(registry.create(base_method(name), profile).config))
        if unknown:
            raise HarnessError(f"--tuned {path}: method {name!r} has no setting "
                               f"{', '.join(map(repr, unknown))}")
    return chosen
