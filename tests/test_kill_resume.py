"""SIGKILL a run at exact points (harness.faults) and resume it: the resumed run must end with the
same accuracy matrix and bitwise the same tensors as one that was never interrupted, and no damaged
stage may ever be read as a result."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from harness.store import RunDir, stage_is_intact
from harness.testing.kit import run_method
from tests.helpers import inside_stage_2, steps_per_stage

TASKS = "agnews,SST-2"
# 32 training examples a task (PER_STAGE optimizer steps on the default profile); evaluation
# generates one batch per task, so the baseline evaluation passes eval_batch 1-2, stage 1's 3-4,
# stage 2's 5-6.
PER_STAGE = steps_per_stage(32)
MID_STAGE_2 = inside_stage_2(32)
KILL_POINTS = {
    "seqlora": ["eval_batch:2",     # evaluating the untrained model, nothing written yet
                "stage_write:2",    # stage 1's files written, folder not yet renamed into place
                "summary:1"],       # every stage in place, summary.json not yet written
    # (for the suite's time, seqlora's eval_batch:5 and stage_done:2 are gone: stage_done:2 is
    # olora's below, and a kill while evaluating after a stage resumes as after eval_batch:2)
    # mid stage 1 (train_step:2) and mid stage 2 (MID_STAGE_2) are the two tests below
    # method state (earlier tasks' A) must survive too
    "olora": [f"train_step:{MID_STAGE_2}", "stage_done:2"],
}


def harness_run(data_dir, results, method, kill_at=None, extra=()):
    """`harness run` in a process of its own, with this process's thread count (the arithmetic of
    `uninterrupted`)."""
    return subprocess.run(harness_command(data_dir, results, method, extra),
                          env=harness_env(kill_at), capture_output=True, text=True)


def harness_command(data_dir, results, method, extra=()):
    return [sys.executable, "-m", "harness", "run", "--method", method, "--tasks", TASKS,
            "--data-dir", str(data_dir), "--results", str(results), "--train-per-task", "32",
            "--test-per-task", "8", "--no-progress", *extra]


def harness_env(kill_at=None):
    """This process's environment with its thread count, and a fault point (`kill_at`) or none."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HARNESS_KILL_AT", None)
    if kill_at:
        env["HARNESS_KILL_AT"] = kill_at
    return env


def uninterrupted(data_dir, results, method, settings=()):
    """The run `harness_run` makes when nothing stops it, made in this process (`settings`: its
    `--set` arguments): a process start is seconds, and the resumed runs are compared with a
    run of another process."""
    return run_method(method, data_dir, results, tasks=tuple(TASKS.split(",")), train_per_task=32,
                      test_per_task=8, settings=settings)


def run_dir(results, method):
    return RunDir(results / "default" / method / "tasks-agnews+SST-2" / "seed0")


def final_state(results, method):
    rd = run_dir(results, method)
    last = rd.stage_folders()[-1]
    return (rd.path / "accuracy_matrix.csv").read_text(), load_file(str(last / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(synthetic_dir, tmp_path_factory):
    """The uninterrupted runs."""
    results = tmp_path_factory.mktemp("reference")
    states = {}
    for method in KILL_POINTS:
        uninterrupted(synthetic_dir, results, method)
        states[method] = final_state(results, method)
    return states


def assert_same_as_reference(results, method, reference):
    matrix, tensors = final_state(results, method)
    ref_matrix, ref_tensors = reference[method]
    assert matrix == ref_matrix
    assert tensors.keys() == ref_tensors.keys()
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)
    rd = run_dir(results, method)
    assert not [p for p in rd.path.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    with_checkpoint = [d.name for d in rd.stage_folders() if (d / "model.safetensors").exists()]
    assert with_checkpoint == ["stage_02-SST-2"]  # only the latest stage keeps one


@pytest.mark.parametrize("method,kill_at",
                         [(m, k) for m, points in KILL_POINTS.items() for k in points])
def test_sigkill_then_resume_gives_the_uninterrupted_result(synthetic_dir, tmp_path, reference,
                                                            method, kill_at):
    killed = harness_run(synthetic_dir, tmp_path, method, kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    rd = run_dir(tmp_path, method)
    assert not rd.is_complete()
    # Whatever has a stage name is whole: a kill leaves only temporary names half-written.
    for folder in rd.path.glob("stage_*"):
        assert stage_is_intact(folder), folder
    resumed = harness_run(synthetic_dir, tmp_path, method)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_as_reference(tmp_path, method, reference)


def test_killed_twice_then_resumed(synthetic_dir, tmp_path, reference):
    """A resumed run that is killed again (its own counters start afresh) still ends right."""
    assert harness_run(synthetic_dir, tmp_path, "seqlora", "stage_write:2").returncode == -9
    assert harness_run(synthetic_dir, tmp_path, "seqlora", "train_step:2").returncode == -9
    assert [d.name for d in run_dir(tmp_path, "seqlora").completed_stages()] == ["stage_00-base"]
    assert harness_run(synthetic_dir, tmp_path, "seqlora").returncode == 0
    assert_same_as_reference(tmp_path, "seqlora", reference)


def test_a_damaged_stage_is_detected_and_trained_again(synthetic_dir, tmp_path, reference):
    """A stage whose files no longer match their checksums is never resumed from."""
    killed = harness_run(synthetic_dir, tmp_path, "seqlora", f"train_step:{MID_STAGE_2}")
    assert killed.returncode == -9
    rd = run_dir(tmp_path, "seqlora")
    stage1 = rd.path / "stage_01-agnews"
    assert [d.name for d in rd.completed_stages()] == ["stage_00-base", "stage_01-agnews"]
    checkpoint = stage1 / "model.safetensors"
    data = bytearray(checkpoint.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight: still a loadable file, a wrong one
    checkpoint.write_bytes(bytes(data))
    assert not stage_is_intact(stage1)
    assert [d.name for d in rd.completed_stages()] == ["stage_00-base"]
    resumed = harness_run(synthetic_dir, tmp_path, "seqlora")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_as_reference(tmp_path, "seqlora", reference)
