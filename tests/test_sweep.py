"""The sweep's pure parts: which runs a command makes, how shards split them, in which order side-by-
side jobs take them, how an array task's command line is derived from the parent's."""

from harness.sweep import expand, without


def test_runs_are_sequence_major_and_shards_take_every_nth():
    sequences = [(1, ("a", "b")), (2, ("b", "a"))]
    specs = expand(["m1", "m2"], sequences, [0, 1], "default")
    assert [(s.order, s.method, s.seed) for s in specs[:4]] == [
        (1, "m1", 0), (1, "m1", 1), (1, "m2", 0), (1, "m2", 1)]
    assert len(specs) == 8 and specs[4].tasks == ("b", "a")
    shards = [expand(["m1", "m2"], sequences, [0, 1], "default", (i, 3)) for i in range(3)]
    assert [len(s) for s in shards] == [3, 3, 2]
    assert sorted((s.order, s.method, s.seed) for part in shards for s in part) == \
        sorted((s.order, s.method, s.seed) for s in specs)  # disjoint, and nothing left out


def test_a_jobs_command_line_drops_the_options_it_replaces():
    argv = ["run", "--all", "--jobs", "2", "--shard=0/2", "--no-progress", "--orders", "1-3"]
    assert without(argv, ("--jobs", "--shard"), flags=("--no-progress",)) == \
        ["run", "--all", "--orders", "1-3"]


def test_side_by_side_jobs_take_the_longest_sequences_first():
    """A job that finishes early takes the next run from the queue: with the long sequences first,
    the sweep ends on short runs; the sweep's order is kept otherwise."""
    from harness.runner import Options
    from harness.sweep import SweepPlan, longest_first

    specs = expand(["m1", "m2"], [(1, ("a", "b")), (4, ("a", "b", "c")), (2, ("b", "a"))], [0],
                   "default")
    plan = SweepPlan("default", Options(), tuple(specs))
    order = longest_first(list(range(len(specs))), plan)
    assert [(specs[i].order, specs[i].method) for i in order] == [
        (4, "m1"), (4, "m2"), (1, "m1"), (1, "m2"), (2, "m1"), (2, "m2")]


def test_job_processes_end_when_the_sweep_process_is_killed(synthetic_dir, tmp_path):
    """A sweep process killed outright (SIGKILL: no handler runs) leaves no job process running
    on unseen: each ends as a preempted process does."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    def state_and_parent(pid: int) -> tuple[str, int] | None:
        """From /proc/PID/stat (fields after the command name); None once the process is gone."""
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return fields[0], int(fields[1])

    def alive(pid: int) -> bool:
        found = state_and_parent(pid)
        return found is not None and found[0] != "Z"

    def children(pid: int) -> list[int]:
        found = {int(p.name): state_and_parent(int(p.name)) for p in Path("/proc").glob("[0-9]*")}
        return [child for child, sp in found.items() if sp is not None and sp[0] != "Z"
                and sp[1] == pid]

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    sweep = subprocess.Popen(
        [sys.executable, "-m", "harness", "run", "--all", "--methods", "seqlora", "--tasks",
         "agnews,SST-2", "--seeds", "0-3", "--jobs", "2", "--data-dir", str(synthetic_dir),
         "--results", str(tmp_path / "r"), "--train-per-task", "64", "--test-per-task", "8",
         "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "r").rglob("stage_01-*")):
        time.sleep(0.2)  # a run is under way in a job process
    jobs = [pid for pid in children(sweep.pid) if "spawn_main" in
            Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
    assert jobs, "no job process found"
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    deadline = time.time() + 60
    while time.time() < deadline and any(alive(pid) for pid in jobs):
        time.sleep(0.2)
    assert not any(alive(pid) for pid in jobs)
