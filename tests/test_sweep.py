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
