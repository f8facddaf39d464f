"""Live curves of a run in the trackers its user already reads (`run --report-to
tensorboard,mlflow,wandb`).

One tracker run per harness run, written by rank 0 only. TensorBoard: into the run's own folder
(`<run>/tensorboard/`), so `tensorboard --logdir RESULTS` shows every run of a sweep grouped by
profile, method, sequence and seed. MLflow: one experiment per results folder (the sweep), one
MLflow run per harness run, named `profile/method/sequence/seed`, in a local SQLite store
(`RESULTS/mlflow.db`) or the server `--mlflow-uri` names. W&B: one run per harness run, grouped
by results folder, offline under `<run>/wandb/` unless `WANDB_MODE` says otherwise. What is logged:
- per optimizer step (`train/*`): the loss, the task loss and each penalty term of the method
  (`penalty/<name>`), the learning rate, the gradient norm before clipping, examples per second;
  the step count runs on across stages;
- per stage (`stage/*`, at the stage's last step): the accuracy of every task, AA over the tasks
  seen, and the seconds spent preparing, training, consolidating and evaluating;
- at the end (`final/*`, at the last step): the summary metrics and parameter metrics, the
  accuracy-matrix heatmap as an image, and the configuration and fingerprint as text.
A resumed run writes into the same folder from the first step of the stage it trains again: the
events a killed process wrote for that stage are dropped (`purge_step`), so the curves show each
step once. Tracking reads values the run computes anyway; it changes no result.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import queue
import threading
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

TRACKERS = ("tensorboard", "mlflow", "wandb")


def parse_report_to(text: str, where: str = "--report-to") -> tuple[str, ...]:
    """`--report-to a,b` (or a profile's list, `where`): known tracker names, or none; each one's
    library must be installed."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise HarnessError(f"{where} {text}: unknown tracker {', '.join(map(repr, unknown))} "
                           f"(known: {', '.join(TRACKERS)}, or none)")
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise HarnessError(f"{where} {text}: the wandb package is not installed "
                           "(pip install 'cl-harness[wandb]')")
    return names


@dataclass(frozen=True)
class TrackingSettings:
    """Where a run reports its curves: no part of what it trains, so apart from the `Profile`."""
    report_to: tuple[str, ...] = ()
    mlflow_uri: str | None = None


def profile_tracking(profile: str, overrides: list[str] | tuple[str, ...] = ()) -> TrackingSettings:
    """The profile file's [tracking] section: report_to (a list of tracker names) and mlflow_uri,
    checked (a bad one names the file)."""
    from harness.profiles import profile_section

    section, where = profile_section(profile, "tracking", overrides)
    if not isinstance(section, dict) or set(section) - {"report_to", "mlflow_uri"}:
        raise HarnessError(f"{where}: [tracking] takes report_to (a list of trackers) and "
                           f"mlflow_uri, got {section!r}")
    names, uri = section.get("report_to", []), section.get("mlflow_uri")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) \
            or not isinstance(uri, (str, type(None))):
        raise HarnessError(f"{where}: tracking.report_to must be a list of tracker names and "
                           f"tracking.mlflow_uri a string, got {names!r} and {uri!r}")
    return TrackingSettings(parse_report_to(",".join(names), f"{where}: tracking.report_to"), uri)


class Tracking:
    """The tracker runs of one harness run; without trackers every call does nothing."""

    def __init__(self, writers: list):
        self.writers = writers

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for writer in self.writers:
            for key, value in values.items():
                if value is not None and math.isfinite(value):
                    writer.add_scalar(f"{prefix}/{key}", value, step)

    def finish(self, summary, config: dict[str, Any], step: int) -> None:
        """The run's results: summary and parameter metrics, the heatmap, the configuration."""
        import numpy as np
        from PIL import Image

        from harness.plots import accuracy_heatmap

        final = {**summary.metrics, **{k: v for k, v in (summary.parameter_metrics or {}).items()
                                       if isinstance(v, (int, float)) and not isinstance(v, bool)}}
        self.scalars("final", final, step)
        with tempfile.TemporaryDirectory() as tmp:
            (png,) = accuracy_heatmap(summary, Path(tmp) / "R", formats={".png": 200})
            image = np.asarray(Image.open(png).convert("RGB"))
        for writer in self.writers:
            writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```",
                            step)
            writer.add_text("fingerprint", config["fingerprint"], step)
            writer.add_image("accuracy_matrix", image, step, dataformats="HWC")

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def open_tracking(names: tuple[str, ...], run_folder: Path, first_step: int, *,
                  results: Path | None = None, run_name: str = "",
                  mlflow_uri: str | None = None, config: dict | None = None) -> Tracking:
    """The trackers `names` for the run in `run_folder`, continuing from global step
    `first_step` (0 for a new run). MLflow's store is `mlflow_uri`, by default a SQLite file in
    `results` shared by the sweep (one experiment per results folder); a W&B run groups by
    results folder and takes the run's `config` as its own."""
    writers: list = []
    if "tensorboard" in names:
        from torch.utils.tensorboard import SummaryWriter

        writers.append(SummaryWriter(log_dir=str(run_folder / "tensorboard"),
                                     purge_step=first_step + 1 if first_step else None))
    results, config = Path(results or run_folder).resolve(), config or {}
    if "mlflow" in names:
        writers.append(MLflowWriter(mlflow_uri or default_mlflow_uri(results), str(results),
                                    run_name, run_folder, config))
    if "wandb" in names:
        writers.append(WandbWriter(run_folder, run_name, results.name, config))
    return Tracking(writers)


def default_mlflow_uri(results: Path) -> str:
    return f"sqlite:///{Path(results).resolve() / 'mlflow.db'}"


def mlflow_experiment(client, name: str) -> str:
    """The id of the experiment `name` (a results folder), created on first use."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=(Path(name) / "mlflow-artifacts").as_uri())


def prepare_mlflow(results: Path, uri: str | None) -> None:
    """Open the store and create the sweep's experiment once, before any run or job writes to it
    (jobs creating a SQLite store's tables at the same time would collide); a store that cannot
    be opened is one line."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if uri is None:
        Path(results).mkdir(parents=True, exist_ok=True)
    where = uri or default_mlflow_uri(results)
    try:
        mlflow_experiment(MlflowClient(tracking_uri=where), str(Path(results).resolve()))
    except (MlflowException, OSError, ValueError) as exc:
        raise HarnessError(f"--mlflow-uri {where}: cannot use it "
                           f"({str(exc).strip().splitlines()[0]})") from None


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """The configuration as MLflow params: nested keys joined by dots ("profile.lora.r"), lists
    and other values as their JSON text (cut to MLflow's 6000 characters)."""
    params = {}
    for key, value in config.items():
        if isinstance(value, dict):
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = (value if isinstance(value, str)
                                        else json.dumps(value, default=str))[:6000]
    return params


class MLflowWriter:
    """The TensorBoard writer's calls, as MLflow logging (`MlflowClient`); the configuration
    also as the run's params, so runs can be filtered and compared by setting. Metrics are sent in
    batches every few seconds, written by MLflow's asynchronous logging, since each call to a
    SQLite store costs about 10 ms (and a batch of a thousand, 100 ms). The run's id
    is kept in `<run>/mlflow.json`, so a resumed harness run continues its MLflow run (MLflow
    cannot delete metric points: a stage trained again logs its steps a second time)."""

    FLUSH_SECONDS = 5.0

    def __init__(self, uri: str, experiment: str, run_name: str, run_folder: Path, config: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        record = run_folder / "mlflow.json"
        earlier = json.loads(record.read_text()) if record.exists() else {}
        if earlier.get("uri") == uri:
            self.run_id = earlier["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment_id = mlflow_experiment(self.client, experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            record.write_text(json.dumps({"uri": uri, "run_id": self.run_id}))
            params = [Param(key, value) for key, value in flat_params(config).items()]
            for start in range(0, len(params), 100):  # MLflow's batch limit for params
                self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.pending: list = []
        self.sending: list = []  # batches being written
        self.flushed = time.monotonic()

    def add_scalar(self, key: str, value: float, step: int) -> None:
        from mlflow.entities import Metric

        self.pending.append(Metric(key, float(value), int(time.time() * 1000), step))
        if time.monotonic() - self.flushed > self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self.pending), 1000):  # MLflow's batch limit
            self.sending.append(self.client.log_batch(  # MLflow's own thread writes the batch
                self.run_id, metrics=self.pending[start:start + 1000], synchronous=False))
        self.pending, self.flushed = [], time.monotonic()

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}.txt")
        if tag == "fingerprint":
            self.client.set_tag(self.run_id, "fingerprint", text)

    def add_image(self, tag: str, image, step: int, dataformats: str = "HWC") -> None:
        self.client.log_image(self.run_id, image, f"{tag}.png")

    def close(self) -> None:
        self.flush()
        for batch in self.sending:
            batch.wait()
        self.client.set_terminated(self.run_id)


class WandbWriter:
    """The TensorBoard writer's calls, as a Weights & Biases run. Offline unless the user chose
    otherwise (`WANDB_MODE`): the run is written under `<run>/wandb/` and `wandb sync` uploads it
    later. Project `WANDB_PROJECT` or "cl-harness", grouped by results folder (the sweep), named
    like the run folder, with the harness configuration as its config. The run's id is kept in
    `<run>/wandb.json`, so a resumed harness run continues its W&B run (each process writes its own
    offline folder; `wandb sync` joins folders of one id in order). The values of one step go in
    one `log` call when the next step begins, and a thread of its own makes the calls: a call costs
    about 1 ms, 3% of a step of the embedded default if the training loop made it."""

    def __init__(self, run_folder: Path, run_name: str, group: str, config: dict):
        import wandb

        record = run_folder / "wandb.json"
        run_id = json.loads(record.read_text())["run_id"] if record.exists() else None
        self.run = wandb.init(
            dir=run_folder, id=run_id, resume="allow", name=run_name, group=group,
            project=os.environ.get("WANDB_PROJECT", "cl-harness"),
            mode=os.environ.get("WANDB_MODE", "offline"), config=config,
            settings=wandb.Settings(console="off", silent=True))  # the progress bar stays ours
        record.write_text(json.dumps({"run_id": self.run.id}))
        self.step, self.values = None, {}
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.sender = threading.Thread(target=self._send, name="wandb-log", daemon=True)
        self.sender.start()

    def _send(self) -> None:
        while (call := self.calls.get()) is not None:
            call()

    def add_scalar(self, key: str, value, step: int) -> None:
        if step != self.step:
            self.flush()
            self.step = step
        self.values[key] = value

    def flush(self) -> None:
        if self.values:
            self.calls.put(functools.partial(self.run.log, self.values, step=self.step))
        self.values = {}

    def add_text(self, tag: str, text: str, step: int) -> None:
        if tag != "config":  # the configuration is the run's config already
            self.calls.put(functools.partial(self.run.summary.__setitem__, tag, text))

    def add_image(self, tag: str, image, step: int, dataformats: str = "HWC") -> None:
        import wandb

        self.add_scalar(tag, wandb.Image(image), step)

    def close(self) -> None:
        self.flush()
        self.calls.put(None)
        self.sender.join()
        self.run.finish()
