"""A full disk loses nothing. The results folder is a small tmpfs; the run stops itself (SIGSTOP, at
a fault point) just before a write, the test fills the tmpfs, and the write fails for want of space:
during a stage checkpoint, a step checkpoint, and summary.json. Each time the run ends with one line
naming the folder and the problem and exit code 2, leaves no half-written file under a final
name, and, once space is freed, `run` resumes to the result of an uninterrupted run.

Needs root to mount a tmpfs (CI runs as root); skipped elsewhere, failed under CI=true.
"""

import os
import signal
import subprocess
import time

import pytest

from harness.checkpoints import is_intact
from harness.store import stage_is_intact
from tests.test_kill_resume import (PER_STAGE, harness_command, harness_env, harness_run, run_dir,
                                    uninterrupted)
from tests.test_step_checkpoints import assert_same, outcome

EVERY = ("--set", "train.checkpoint_every=2")


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (a run of the test's size writes about 3 MiB)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs under CI: {done.stderr}")
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk, leave: int):
    """Take all but `leave` bytes of the tmpfs."""
    stat = os.statvfs(disk)
    size = stat.f_bavail * stat.f_frsize - leave
    with open(disk / "ballast", "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, max(size, 0))


def stopped_at(data_dir, results, stop_at):
    """A run that stops itself at `stop_at` (a fault point): its process, once stopped."""
    process = subprocess.Popen(harness_command(data_dir, results, "seqlora", EVERY),
                               env=harness_env(f"{stop_at}:STOP"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while open(f"/proc/{process.pid}/stat").read().split()[2] != "T":
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return process


@pytest.fixture(scope="module")
def reference(synthetic_dir, tmp_path_factory):
    results = tmp_path_factory.mktemp("whole")
    uninterrupted(synthetic_dir, results, "seqlora", EVERY[1:])
    return outcome(results, "seqlora")


# Where the disk fills: after stage 1's evaluation (evaluation batches 1-2 are the base row's, 3-4
# stage 1's; its stage folder and model checkpoint are written next), after step 1 of stage 2 (the
# step checkpoint after its step 2 is written next), and before summary.json.
@pytest.mark.parametrize("stop_at", ["eval_batch:4", f"train_step:{PER_STAGE + 1}", "summary:1"],
                         ids=["stage checkpoint", "step checkpoint", "summary"])
def test_a_full_disk_stops_the_run_cleanly_and_it_resumes(synthetic_dir, small_disk, reference,
                                                          stop_at):
    results = small_disk / "results"
    process = stopped_at(synthetic_dir, results, stop_at)
    fill(small_disk, leave=0)
    process.send_signal(signal.SIGCONT)
    out, err = process.communicate(timeout=300)
    folder = run_dir(results, "seqlora")
    assert process.returncode == 2, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"error: {folder.path}: no space left on the device of the results folder; every stage "
        "and checkpoint written so far is whole: free space and run the same command again to "
        "resume")
    assert "Traceback" not in err
    assert not folder.is_complete()
    assert all(stage_is_intact(stage) for stage in folder.path.glob("stage_*"))
    assert all(is_intact(c, 1) for c in (folder.path / "checkpoints").glob("*"))
    (small_disk / "ballast").unlink()
    resumed = harness_run(synthetic_dir, results, "seqlora", extra=EVERY)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same(outcome(results, "seqlora"), reference)
