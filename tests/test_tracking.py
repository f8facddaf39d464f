"""`run --report-to tensorboard,mlflow,wandb`: what a run logs, read back through each library's own
reader (TensorBoard's event reader, MlflowClient, the records of a W&B offline run); tracking
changes no result; a resumed run continues its curves without repeating a step."""

import json
import os
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from harness.cli import main
from harness.store import RunSpec
from tests.test_kill_resume import MID_STAGE_2, PER_STAGE

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# One worker runs the module: its tests share the tracked run.
pytestmark = pytest.mark.xdist_group("tracking")
TASKS = ("agnews", "SST-2")
ARGS = ["--tasks", ",".join(TASKS), "--train-per-task", "32", "--test-per-task", "8", "--no-progress"]


def events(folder):
    accumulator = EventAccumulator(str(folder / "tensorboard"),
                                   size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def run_folder(results, method="olora"):
    return RunSpec(method=method, tasks=TASKS, seed=0, profile="default").folder(results)


@pytest.fixture(scope="module")
def runs(synthetic_dir, tmp_path_factory):
    """One run without tracking and the same run reported to TensorBoard, MLflow and W&B."""
    root = tmp_path_factory.mktemp("tracking")
    for name, extra in (("plain", []), ("tracked", ["--report-to", "tensorboard,mlflow,wandb"])):
        assert main(["run", "--method", "olora", "--data-dir", str(synthetic_dir), "--results",
                     str(root / name), *ARGS, *extra]) == 0
    return root


def test_a_tracked_run_logs_steps_stages_and_results_and_changes_nothing(runs):
    plain, tracked = run_folder(runs / "plain"), run_folder(runs / "tracked")
    assert (plain / "accuracy_matrix.csv").read_text() == (tracked / "accuracy_matrix.csv").read_text()
    a, b = (load_file(str(f / "stage_02-SST-2" / "model.safetensors")) for f in (plain, tracked))
    assert all((a[k] == b[k]).all() for k in a)
    assert not (plain / "tensorboard").exists()

    log = events(tracked)
    summary = json.loads((tracked / "summary.json").read_text())
    steps = sum(json.loads((tracked / s / "metrics.json").read_text())["train"]["steps"]
                for s in ("stage_01-agnews", "stage_02-SST-2"))
    assert [e.step for e in log.Scalars("train/loss")] == list(range(1, steps + 1))
    assert {"train/lr", "train/grad_norm", "train/examples_per_second"} <= set(log.Tags()["scalars"])
    # The loss is the task loss plus O-LoRA's penalty terms, each logged apart; the orthogonality
    # term from stage 2 on, when there is an old branch to be orthogonal to.
    train = {tag: {e.step: e.value for e in log.Scalars(tag)} for tag in log.Tags()["scalars"]
             if tag.startswith("train/")}
    penalties = [tag for tag in train if tag.startswith("train/penalty/")]
    orthogonal = train["train/penalty/orthogonal"]
    assert min(orthogonal) == PER_STAGE + 1 and orthogonal[2 * PER_STAGE] > 0
    for step, loss in train["train/loss"].items():
        assert loss == pytest.approx(train["train/task_loss"][step]
                                     + sum(train[tag].get(step, 0.0) for tag in penalties), rel=1e-5)
    R = summary["accuracy_matrix"]
    assert [e.value for e in log.Scalars("stage/accuracy/agnews")] == pytest.approx([R[1][0], R[2][0]])
    assert [e.value for e in log.Scalars("stage/AA_seen")] == \
        pytest.approx([R[1][0], (R[2][0] + R[2][1]) / 2])
    assert log.Scalars("final/AA")[0].value == pytest.approx(summary["metrics"]["AA"])
    assert log.Tags()["images"] == ["accuracy_matrix"]
    assert summary["fingerprint"].encode() in log.Tensors("fingerprint/text_summary")[0] \
        .tensor_proto.string_val[0]


def test_a_resumed_run_continues_its_curves_without_repeating_steps(synthetic_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_KILL_AT": f"train_step:{MID_STAGE_2}"}
    argv = [sys.executable, "-m", "harness", "run", "--method", "seqlora", "--data-dir",
            str(synthetic_dir), "--results", str(tmp_path), *ARGS, "--report-to", "tensorboard"]
    assert subprocess.run(argv, env=env, capture_output=True).returncode == -9  # mid stage 2
    env.pop("HARNESS_KILL_AT")
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    log = events(run_folder(tmp_path, "seqlora"))
    assert [e.step for e in log.Scalars("train/loss")] == list(range(1, 2 * PER_STAGE + 1))
    assert [e.step for e in log.Scalars("stage/AA_seen")] == [PER_STAGE, 2 * PER_STAGE]  # stage ends


def wandb_records(folder):
    """(offline-run folder, record) for every record W&B wrote for the run in `folder`."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        store = DataStore()
        store.open_for_scan(str(path))
        while (data := store.scan_data()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            yield path.parent.name, record


def test_wandb_writes_an_offline_run_that_a_resumed_run_continues(runs, synthetic_dir):
    pytest.importorskip("wandb")
    results = runs / "tracked"
    folder = run_folder(results)
    summary = json.loads((folder / "summary.json").read_text())
    records = list(wandb_records(folder))
    [run] = [r.run for _, r in records if r.HasField("run")]
    assert (run.display_name, run.run_group, run.project) == \
        ("default/olora/tasks-agnews+SST-2/seed0", "tracked", "cl-harness")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["fingerprint"] == summary["fingerprint"] and config["run"]["method"] == "olora"
    history = [(r.history.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                     for i in r.history.item})
               for _, r in records if r.HasField("history")]
    steps = 2 * PER_STAGE
    assert [step for step, values in history if "train/loss" in values] == list(range(1, steps + 1))
    last_step, last = history[-1]
    assert last_step == steps and last["final/AA"] == pytest.approx(summary["metrics"]["AA"])
    assert last["stage/AA_seen"] == pytest.approx(summary["stage_average_accuracy"][-1])
    assert last["accuracy_matrix/_type"] == "image-file"
    (folder / "summary.json").unlink()  # as if killed before the summary: resumed, not restarted
    assert main(["run", "--method", "olora", "--data-dir", str(synthetic_dir), "--results",
                 str(results), *ARGS, "--report-to", "wandb"]) == 0
    # W&B's service process writes the offline file; on a loaded machine the run record of the
    # second folder can land a moment after finish() returned
    deadline = time.monotonic() + 30
    while True:
        runs_written = {(name, r.run.run_id) for name, r in wandb_records(folder)
                        if r.HasField("run")}
        if len(runs_written) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(runs_written) == 2 and {run_id for _, run_id in runs_written} == {run.run_id}


def test_mlflow_gets_one_run_per_harness_run_in_the_sweeps_experiment(runs, synthetic_dir):
    """Read back with MlflowClient: the same values TensorBoard gets, and a resumed harness run
    (here: the same run asked again after its summary was removed) continues its MLflow run."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    results = runs / "tracked"
    client = MlflowClient(tracking_uri=f"sqlite:///{results.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(str(results.resolve()))
    [run] = client.search_runs([experiment.experiment_id])
    folder = run_folder(results)
    summary = json.loads((folder / "summary.json").read_text())
    assert run.info.run_name == "default/olora/tasks-agnews+SST-2/seed0"
    assert run.info.status == "FINISHED" and run.data.tags["fingerprint"] == summary["fingerprint"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == \
        list(range(1, 2 * PER_STAGE + 1))
    assert run.data.metrics["final/AA"] == pytest.approx(summary["metrics"]["AA"])
    assert run.data.metrics["stage/AA_seen"] == pytest.approx(summary["stage_average_accuracy"][-1])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= \
        {"accuracy_matrix.png", "config.txt", "fingerprint.txt"}
    config = json.loads((folder / "config.json").read_text())
    assert run.data.params["run.method"] == "olora" and run.data.params["fingerprint"] == \
        summary["fingerprint"]
    assert run.data.params["profile.lora.r"] == str(config["profile"]["lora"]["r"])
    assert run.data.params["run.tasks"] == json.dumps(list(TASKS))
    (folder / "summary.json").unlink()  # as if killed before the summary: resumed, not restarted
    assert main(["run", "--method", "olora", "--data-dir", str(synthetic_dir), "--results",
                 str(results), *ARGS, "--report-to", "mlflow"]) == 0
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run.info.run_id]


def test_wandb_without_its_package_is_one_line(monkeypatch):
    import importlib.util

    from harness.errors import HarnessError
    from harness.tracking import parse_report_to

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(HarnessError, match="wandb package is not installed"):
        parse_report_to("tensorboard,wandb")
    assert parse_report_to("tensorboard") == ("tensorboard",)


@pytest.fixture
def tracked_profile(tmp_path, monkeypatch):
    """A profile folder holding `default` and `watched`: the default profile with a [tracking]
    section."""
    from harness import profiles

    default = (profiles.PROFILE_DIR / "default.toml").read_text()
    (tmp_path / "default.toml").write_text(default)
    (tmp_path / "watched.toml").write_text(
        default + '\n[tracking]\nreport_to = ["tensorboard", "mlflow"]\nmlflow_uri = "sqlite:///w.db"\n')
    monkeypatch.setattr(profiles, "PROFILE_DIR", tmp_path)
    return tmp_path


def test_a_profile_names_the_trackers_unless_the_command_line_does(tracked_profile):
    from types import SimpleNamespace

    from harness.cli.run import _trackers
    from harness.profiles import load_profile
    from harness.tracking import TrackingSettings, profile_tracking

    assert profile_tracking("watched") == TrackingSettings(("tensorboard", "mlflow"), "sqlite:///w.db")
    assert profile_tracking("default") == TrackingSettings()
    # Trackers change no result: not part of the profile a fingerprint is made of.
    assert {**load_profile("watched").as_dict(), "name": "default"} == load_profile("default").as_dict()

    def args(profile, report_to=None, mlflow_uri=None):
        return SimpleNamespace(profile=profile, overrides=[], report_to=report_to, mlflow_uri=mlflow_uri)

    assert _trackers(args("watched")) == {"report_to": ("tensorboard", "mlflow"),
                                          "mlflow_uri": "sqlite:///w.db"}
    assert _trackers(args("watched", "none"))["report_to"] == ()
    assert _trackers(args("default")) == {"report_to": (), "mlflow_uri": None}
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="--mlflow-uri only applies"):
        _trackers(args("watched", "tensorboard", "sqlite:///x.db"))


@pytest.mark.parametrize("section, message", [
    ('report_to = ["tensorboard", "nosuch"]', "tracking.report_to tensorboard,nosuch: unknown tracker 'nosuch'"),
    ('report_to = "tensorboard"', "must be a list of tracker names"),
    ('reportto = ["tensorboard"]', "[tracking] takes report_to"),
])
def test_a_bad_tracking_section_names_the_profile_file(tracked_profile, section, message):
    from harness.errors import HarnessError
    from harness.tracking import profile_tracking

    path = tracked_profile / "bad.toml"
    path.write_text((tracked_profile / "default.toml").read_text() + f"\n[tracking]\n{section}\n")
    with pytest.raises(HarnessError) as error:
        profile_tracking("bad")
    assert str(path) in str(error.value) and message in str(error.value)
