"""`run --all --executor slurm|local`: a sweep submitted as a job array gives the results of a local
run, also when Slurm requeues a task mid-run. The Slurm tests need a cluster (`.ci/run` starts a
one-node one, `.ci/slurm-up.sh`); without `sbatch` they are skipped, except under CI."""

import json
import os
import shutil
import subprocess
import time

import pytest

from harness.cli import main
from harness.executor import executor_parameters, minutes, parse_slurm
from harness.errors import HarnessError
from harness.status import sweep_status
from tests.helpers import inside_stage_2

# One worker runs the module: its sweeps share the reference and the cluster's two cores.
pytestmark = pytest.mark.xdist_group("slurm")
SWEEP = ["--all", "--methods", "seqlora,olora", "--tasks", "agnews,SST-2", "--train-per-task", "24",
         "--test-per-task", "8", "--no-progress"]


def matrices(results):
    return {str(p.parent.relative_to(results)): p.read_text()
            for p in sorted(results.glob("*/*/*/seed*/accuracy_matrix.csv"))}


@pytest.fixture(scope="module")
def reference(synthetic_dir, tmp_path_factory):
    """The sweep run here, two processes of one thread each (as the array tasks run)."""
    results = tmp_path_factory.mktemp("local") / "results"
    assert main(["run", *SWEEP, "--seeds", "0-1", "--data-dir", str(synthetic_dir), "--results",
                 str(results), "--jobs", "2"]) == 0
    return matrices(results)


def sbatch():
    """Skip without a Slurm cluster to submit to (fail under CI, which starts one)."""
    if shutil.which("sbatch") is None:
        reason = "sbatch is not on the PATH"
    elif subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        reason = "no Slurm controller answers (sinfo fails)"
    else:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must start a Slurm cluster (.ci/slurm-up.sh): {reason}")
    pytest.skip(f"no Slurm here: {reason} (.ci/slurm-up.sh starts a one-node cluster)")


def test_slurm_settings_become_submitit_parameters():
    assert minutes("24:00:00", "x") == 1440 and minutes("2-00", "x") == 2880
    assert minutes("30", "x") == 30 and minutes("1:30", "x") == 2  # M:S, rounded up
    params = executor_parameters(parse_slurm("partition=gpu,gpus_per_node=8,time=1-00:00:00,"
                                             "array_parallelism=4,account=abc,reservation=r1"), "x")
    assert params == {"timeout_min": 1440, "slurm_partition": "gpu", "gpus_per_node": 8,
                      "slurm_array_parallelism": 4, "slurm_account": "abc",
                      "slurm_additional_parameters": {"reservation": "r1"}}
    for bad in ("partition", "time=tomorrow", "gpus_per_node=eight"):
        with pytest.raises(HarnessError):
            executor_parameters(parse_slurm(bad), "--slurm")


def test_the_local_executor_runs_the_sweep_as_a_local_run_does(reference, synthetic_dir, tmp_path):
    results = tmp_path / "results"
    assert main(["run", *SWEEP, "--seeds", "0", "--data-dir", str(synthetic_dir), "--results",
                 str(results), "--executor", "local", "--wait"]) == 0
    ours = matrices(results)
    assert ours and ours == {run: m for run, m in reference.items() if run.endswith("seed0")}
    assert {s.state for s in sweep_status(results)} == {"complete"}


def test_a_slurm_sweep_gives_the_local_results(reference, synthetic_dir, tmp_path):
    sbatch()
    results = tmp_path / "results"
    assert main(["run", *SWEEP, "--seeds", "0-1", "--data-dir", str(synthetic_dir), "--results",
                 str(results), "--executor", "slurm", "--slurm", "cpus_per_task=1,time=20",
                 "--wait"]) == 0
    assert matrices(results) == reference
    assert any((results / "slurm").rglob("*_log.out"))  # the jobs' logs, under the results
    assert {(s.state, s.detail) for s in sweep_status(results)} == {("complete", "slurm completed")}


def test_a_requeued_task_resumes_and_the_sweep_completes(reference, synthetic_dir, tmp_path,
                                                         monkeypatch):
    """A task killed while its run trains stage 2 (the first of the array's tasks to reach that
    step, SIGKILL, once) is requeued: Slurm starts it again, the run resumes from its last complete
    stage, and the sweep ends with the local results."""
    sbatch()
    results, marker = tmp_path / "results", tmp_path / "killed"
    # Inside stage 2 of the sweep's 24 examples a task (the jobs inherit the setting).
    monkeypatch.setenv("HARNESS_KILL_AT", f"train_step:{inside_stage_2(24)}")
    monkeypatch.setenv("HARNESS_KILL_ONCE", str(marker))
    assert main(["run", *SWEEP, "--seeds", "0-1", "--data-dir", str(synthetic_dir), "--results",
                 str(results), "--executor", "slurm", "--slurm", "cpus_per_task=1,time=20"]) == 0
    [record] = [json.loads(p.read_text()) for p in (results / "sweeps").glob("*.json")]
    job = record["slurm"]["job_id"]
    deadline = time.monotonic() + 240
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline, "no array task reached the kill point"
        time.sleep(0.2)
    index = int(marker.read_text())
    task = results / record["slurm"]["tasks"][index]
    assert not (task / "summary.json").exists()  # killed mid-run
    stage1 = (task / "stage_01-agnews" / "predictions.jsonl").stat().st_mtime_ns
    while subprocess.run(["squeue", "-h", "-j", f"{job}_{index}"], capture_output=True,
                         text=True).stdout.strip():  # until Slurm has ended the killed task
        assert time.monotonic() < deadline, "the killed task never ended"
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", f"{job}_{index}"], check=True)
    while {s.state for s in sweep_status(results)} != {"complete"}:
        assert time.monotonic() < deadline, [vars(s) for s in sweep_status(results)]
        time.sleep(2)
    assert matrices(results) == reference
    restarts = subprocess.run(["scontrol", "show", "job", f"{job}_{index}"], capture_output=True,
                              text=True).stdout
    assert "Restarts=1" in restarts  # Slurm ran the task a second time...
    assert (task / "stage_01-agnews" / "predictions.jsonl").stat().st_mtime_ns == stage1  # resumed


def test_a_profile_holds_the_slurm_settings(tmp_path, monkeypatch):
    from harness import profiles

    default = (profiles.PROFILE_DIR / "default.toml").read_text()
    (tmp_path / "default.toml").write_text(default)
    (tmp_path / "cluster.toml").write_text(default + '\n[slurm]\npartition = "gpu"\ngpus_per_node = 8\n')
    (tmp_path / "broken.toml").write_text(default + '\n[slurm]\ntime = "tomorrow"\n')
    monkeypatch.setattr(profiles, "PROFILE_DIR", tmp_path)
    from harness.executor import profile_slurm

    assert profile_slurm("cluster") == {"partition": "gpu", "gpus_per_node": "8"}
    assert profile_slurm("default") == {}
    assert {**profiles.load_profile("cluster").as_dict(), "name": "default"} \
        == profiles.load_profile("default").as_dict()
    with pytest.raises(HarnessError, match=r"broken\.toml: \[slurm\]: time=tomorrow"):
        profile_slurm("broken")


def test_a_signalled_task_checkpoints_inside_its_stage_and_the_sweep_completes(synthetic_dir,
                                                                               tmp_path):
    """SIGUSR2 (what Slurm sends before a time limit, with `--signal=USR2@...` as submitit asks)
    reaches a task while it trains its first stage: the run writes a step checkpoint at the next
    step boundary, submitit requeues the task, and the requeued task resumes at that step (not at
    the stage's start) and ends with the result of a local run. `scancel --signal` stands in for
    Slurm's own timer, whose signal may come up to a minute early (its event resolution)."""
    sbatch()
    # 120 examples, batch 16, 12 epochs: 96 steps per stage, a step checkpoint every 8 (the test
    # signals once one exists: the task is training), and one when the signal comes
    sweep = ["--all", "--methods", "seqlora", "--tasks", "agnews,SST-2", "--test-per-task", "8",
             "--no-progress", "--data-dir", str(synthetic_dir), "--set", "train.epochs=12",
             "--set", "train.checkpoint_every=8"]
    local = tmp_path / "local"
    assert main(["run", *sweep, "--results", str(local), "--jobs", "2"]) == 0  # one thread, as the task
    results = tmp_path / "results"
    assert main(["run", *sweep, "--results", str(results), "--executor", "slurm", "--slurm",
                 "cpus_per_task=1,time=20"]) == 0
    [record] = [json.loads(p.read_text()) for p in (results / "sweeps").glob("*.json")]
    job, task = record["slurm"]["job_id"], results / record["slurm"]["tasks"][0]
    deadline = time.monotonic() + 240
    while not any((task / "checkpoints").glob("stage00-*")):  # training stage 1
        assert time.monotonic() < deadline, "the array task never started"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR2", str(job)], check=True)  # one run: a plain job
    while {s.state for s in sweep_status(results)} != {"complete"}:
        assert time.monotonic() < deadline, [vars(s) for s in sweep_status(results)]
        time.sleep(2)
    assert matrices(results) == matrices(local)
    shown = subprocess.run(["scontrol", "show", "job", str(job)], capture_output=True,
                           text=True).stdout
    assert "Restarts=1" in shown  # requeued once, by submitit
    logs = "".join(p.read_text() for p in (results / "slurm").rglob("*_log.err"))
    assert "Caught signal SIGUSR2" in logs and "resuming stage 1 after step" in logs
