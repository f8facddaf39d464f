"""The sweep's pure parts: which runs a command makes, how shards split them, how a job's command
line is derived from the parent's."""

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


def test_the_progress_bar_counts_the_lines_that_end_a_run_only():
    """`--jobs` relays every line its jobs print; only a run's result line or a skip advances the
    bar (a warning once made a sweep of 3 runs end at 4)."""
    from types import SimpleNamespace

    from harness.store import RunSpec
    from harness.sweep import ends_a_run, result_line

    spec = RunSpec(method="seqlora", tasks=("a", "b"), seed=0, profile="default", order=1)
    summary = SimpleNamespace(metrics={"AA": 51.25, "BWT": -3.5}, train_eval_seconds=2.0)
    assert ends_a_run(result_line(spec, summary))
    assert ends_a_run("skipped: results/x is locked by another process")
    assert not ends_a_run("warning: seqlora order 1: a short free subspace at stage 2 (see run.log)")
    assert not ends_a_run("[2026-12-03 11:00:03,626] [WARNING] [real_accelerator.py:213] CPU")
