"""End to end through the CLI: results layout, determinism, resume, skip, bad arguments."""

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harness.backbone import load_backbone
from harness.cli import main
from harness.machine import usable_cores
from harness.metrics import normalize
from harness.textio import Batcher


def run(synthetic_dir, results, *extra):
    return main(["run", "--data-dir", str(synthetic_dir), "--results", str(results),
                 "--train-per-task", "32", "--test-per-task", "8", "--no-progress", *extra])


def crash_at_stage(monkeypatch, stage):
    """Make training raise at the start of `stage` (1-based), as a killed process would stop."""
    import harness.runner

    real_fit, calls = harness.runner.fit, []

    def crashing_fit(*args, **kwargs):
        calls.append(1)
        if len(calls) == stage:
            raise RuntimeError("killed")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(harness.runner, "fit", crashing_fit)


def final_tensors(results, method="seqlora", seq="tasks-agnews+SST-2"):
    from safetensors.torch import load_file

    run_dir = results / "default" / method / seq / "seed0"
    last = sorted(run_dir.glob("stage_*"))[-1]
    return load_file(str(last / "model.safetensors"))


def same_tensors(a, b):
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def matrix(results, method="seqlora", seq="tasks-agnews+SST-2", seed=0):
    return (results / "default" / method / seq / f"seed{seed}" / "accuracy_matrix.csv").read_text()


@pytest.fixture(scope="module")
def first_run(synthetic_dir, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    assert run(synthetic_dir, results, "--method", "seqlora", "--tasks", "agnews,SST-2") == 0
    return results


def test_results_layout(first_run):
    run_dir = first_run / "default" / "seqlora" / "tasks-agnews+SST-2" / "seed0"
    names = sorted(p.name for p in run_dir.iterdir() if p.name != ".lock")
    assert names == ["accuracy_matrix.csv", "config.json", "format_matrix.csv", "run.log",
                     "stage_00-base", "stage_01-agnews", "stage_02-SST-2", "stages.json",
                     "summary.json"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["benchmark"]["kind"] == "synthetic"
    assert len(summary["accuracy_matrix"]) == 3 and len(summary["accuracy_matrix"][0]) == 2
    assert set(summary["metrics"]) >= {"AA", "BWT", "FWT", "forgetting"}
    preds = (run_dir / "stage_02-SST-2" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 16 and set(json.loads(preds[0])) >= {"task", "index", "gold", "prediction",
                                                              "correct"}
    # O: each cell's share of answers outside the task's label set, from that stage's predictions.
    sst2 = {"good", "bad"}  # SST-2's labels, normalised
    outside = [normalize(json.loads(p)["prediction"]) not in sst2
               for p in preds if json.loads(p)["task"] == "SST-2"]
    assert summary["format_matrix"][2][1] == pytest.approx(100 * sum(outside) / len(outside))
    assert (run_dir / "format_matrix.csv").read_text().splitlines()[0] == "stage,agnews,SST-2"
    m = summary["metrics"]
    assert m["BWT_format"] + m["BWT_label"] == pytest.approx(m["BWT"])
    # Only the latest stage keeps a checkpoint.
    assert (run_dir / "stage_02-SST-2" / "model.safetensors").exists()
    assert not (run_dir / "stage_01-agnews" / "model.safetensors").exists()


def test_same_seed_same_matrix_and_resume_after_a_crash(first_run, synthetic_dir, tmp_path,
                                                        monkeypatch):
    expected = matrix(first_run)
    assert run(synthetic_dir, tmp_path / "again", "--method", "seqlora", "--tasks", "agnews,SST-2") == 0
    assert matrix(tmp_path / "again") == expected

    # Crash in the middle of stage 2's training: stage 1 is complete, stage 2 never appears.
    crash_at_stage(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="killed"):
        run(synthetic_dir, tmp_path, "--method", "seqlora", "--tasks", "agnews,SST-2")
    run_dir = tmp_path / "default" / "seqlora" / "tasks-agnews+SST-2" / "seed0"
    assert sorted(p.name for p in run_dir.iterdir() if p.name != ".lock") == [
        "config.json", "failed.json", "run.log", "stage_00-base", "stage_01-agnews", "stages.json"]
    assert "RuntimeError" in json.loads((run_dir / "failed.json").read_text())["error"]
    stage1 = (run_dir / "stage_01-agnews" / "predictions.jsonl").stat().st_mtime_ns
    monkeypatch.undo()
    assert run(synthetic_dir, tmp_path, "--method", "seqlora", "--tasks", "agnews,SST-2") == 0
    assert not (run_dir / "failed.json").exists()  # the error of an earlier attempt is cleared
    assert (run_dir / "stage_01-agnews" / "predictions.jsonl").stat().st_mtime_ns == stage1  # kept
    assert matrix(tmp_path) == expected
    assert same_tensors(final_tensors(tmp_path), final_tensors(first_run))


def test_complete_runs_are_skipped(first_run, synthetic_dir):
    summary = first_run / "default" / "seqlora" / "tasks-agnews+SST-2" / "seed0" / "summary.json"
    stamp = summary.stat().st_mtime_ns
    assert run(synthetic_dir, first_run, "--method", "seqlora", "--tasks", "agnews,SST-2") == 0
    assert summary.stat().st_mtime_ns == stamp


# Every method's resume after a kill between and inside stages is a check of the plugin contract
# (tests/test_contract.py runs it on every built-in method).


def test_table_prints_leaderboard(first_run, capsys):
    assert main(["table", "--results", str(first_run)]) == 0
    out = capsys.readouterr().out
    assert "seqlora" in out and "tasks-agnews+SST-2" in out and "synthetic" in out


@pytest.mark.parametrize("argv, message", [
    (["run", "--method", "nosuch", "--order", "1"], "unknown method 'nosuch'"),
    (["run", "--method", "seqlora", "--order", "9"], "unknown order 9"),
    (["run", "--method", "seqlora", "--tasks", "agnews,nosuch"], "unknown task 'nosuch'"),
    (["run", "--method", "seqlora"], "give --order K or --tasks"),
    (["run", "--method", "seqlora", "--order", "1", "--profile", "nosuch"], "unknown profile"),
    (["run", "--method", "seqlora", "--order", "1", "--train-per-task", "-3"], "positive integer"),
    (["run", "--method", "seqlora", "--order", "1", "--data-dir", "/no/such/dir"], "no such directory"),
    (["run", "--method", "seqlora", "--order", "x"], "invalid int value"),
    (["table", "--results", "/no/such/results"], "no such directory"),
    (["run", "--method", "seqlora", "--order", "1", "--seed", str(2**64)], "out of range"),
    (["run", "--method", "seqlora", "--order", "1", "--seeds", "1,2"], "only apply with --all"),
    (["run", "--all", "--tasks", "agnews", "--orders", "1"], "not both"),
    (["run", "--method", "seqlora", "--order", "1", "--model", "/no/such/model"], "no such file or folder"),
    (["run", "--all", "--shard", "3/3"], "expected 0 <= i < N"),
    (["run", "--all", "--shard", "x"], "expected i/N"),
    (["run", "--method", "seqlora", "--order", "1", "--shard", "0/2"], "only apply with --all"),
    (["run", "--all", "--orders", "3-1"], "ranges like 1-3"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys, tmp_path):
    assert main(argv + (["--results", str(tmp_path)] if argv[0] == "run" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing written


def test_other_configuration_is_refused_and_force_keeps_results_on_bad_input(first_run, synthetic_dir,
                                                                            capsys):
    # Same run folder, other sub-sample size: refused, nothing changed.
    summary = first_run / "default" / "seqlora" / "tasks-agnews+SST-2" / "seed0" / "summary.json"
    before = summary.read_text()
    assert main(["run", "--data-dir", str(synthetic_dir), "--results", str(first_run),
                 "--train-per-task", "40", "--test-per-task", "8", "--no-progress",
                 "--method", "seqlora", "--tasks", "agnews,SST-2"]) == 2
    assert "another configuration" in capsys.readouterr().err
    # --force with a bad --model fails before deleting anything.
    assert run(synthetic_dir, first_run, "--method", "seqlora", "--tasks", "agnews,SST-2", "--force",
               "--model", "/no/such/model") == 2
    assert summary.read_text() == before


def test_moved_data_and_results_resume_where_they_lie_and_changed_data_is_refused(
        first_run, synthetic_dir, tmp_path, capsys):
    # Another machine: the results and the data copied, each to another folder. The run is
    # found complete there (skipped, not refused as another configuration).
    data, results = tmp_path / "data", tmp_path / "results"
    shutil.copytree(synthetic_dir, data)
    shutil.copytree(first_run, results)
    args = ("--method", "seqlora", "--tasks", "agnews,SST-2")
    summary = results / "default" / "seqlora" / "tasks-agnews+SST-2" / "seed0" / "summary.json"
    before = summary.read_text()
    assert run(data, results, *args) == 0 and summary.read_text() == before
    # One changed test record is other data: refused, nothing changed.
    test_json = next(data.rglob("SST-2/test.json"))
    test_json.write_text(test_json.read_text().replace("a", "b", 1))
    assert run(data, results, *args) == 2
    assert "another configuration" in capsys.readouterr().err and summary.read_text() == before


def test_runs_recorded_before_the_data_digest_keep_their_fingerprint(first_run, synthetic_dir,
                                                                      tmp_path):
    # As such a run was recorded: no digest, the fingerprint over the data folder instead.
    results = tmp_path / "results"
    shutil.copytree(first_run, results)
    run_dir = results / "default" / "seqlora" / "tasks-agnews+SST-2" / "seed0"
    config = json.loads((run_dir / "config.json").read_text())
    del config["benchmark"]["data"]
    named = {k: v for k, v in config.items() if k not in ("fingerprint", "versions")}
    config["fingerprint"] = hashlib.sha256(
        json.dumps(named, sort_keys=True, default=str).encode()).hexdigest()[:16]
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["fingerprint"] = config["fingerprint"]
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "summary.json").write_text(json.dumps(summary))
    before = (run_dir / "summary.json").read_text()
    assert run(synthetic_dir, results, "--method", "seqlora", "--tasks", "agnews,SST-2") == 0
    assert (run_dir / "summary.json").read_text() == before  # skipped as complete


def test_a_torn_config_is_refused_until_force_runs_again(first_run, synthetic_dir, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(first_run, results)
    run_dir = results / "default" / "seqlora" / "tasks-agnews+SST-2" / "seed0"
    (run_dir / "config.json").write_text('{"fingerprint": ')
    args = ("--method", "seqlora", "--tasks", "agnews,SST-2")
    assert run(synthetic_dir, results, *args) == 0  # complete: skipped, as its summary says
    (run_dir / "summary.json").unlink()
    assert run(synthetic_dir, results, *args) == 2
    assert "config.json: unreadable result file" in capsys.readouterr().err
    assert run(synthetic_dir, results, *args, "--force") == 0
    assert matrix(results) == matrix(first_run)


def test_damaged_stage_and_leftovers_are_redone(synthetic_dir, tmp_path):
    args = ("--method", "seqft", "--tasks", "agnews,SST-2")
    assert run(synthetic_dir, tmp_path, *args) == 0
    run_dir = tmp_path / "default" / "seqft" / "tasks-agnews+SST-2" / "seed0"
    expected = matrix(tmp_path, "seqft")
    (run_dir / "summary.json").unlink()
    (run_dir / "stage_02-SST-2" / "metrics.json").write_text('{"stage": 2, "acc')  # torn write
    (run_dir / ".stage_03-x.abcd").mkdir()                                      # killed mid-write
    assert run(synthetic_dir, tmp_path, *args) == 0
    assert matrix(tmp_path, "seqft") == expected
    assert [p.name for p in run_dir.glob(".*")] == [".lock"]  # only the run lock


def test_shards_split_the_sweep_into_disjoint_parts(synthetic_dir, tmp_path, monkeypatch):
    from harness.runner import Runner

    seen = {}

    def record(self, spec, force=False):
        seen.setdefault(current, []).append((spec.method, spec.order, spec.seed))
        return SimpleNamespace(metrics={"AA": 0.0}, train_eval_seconds=0.0)

    monkeypatch.setattr(Runner, "run", record)
    args = ["run", "--all", "--methods", "seqlora,inclora", "--orders", "1-3", "--seeds", "0-1",
            "--data-dir", str(synthetic_dir), "--results", str(tmp_path), "--no-progress",
            "--jobs", "1"]
    for current in ("all", "0/3", "1/3", "2/3"):
        assert main(args + ([] if current == "all" else ["--shard", current])) == 0
    shards = [set(seen[k]) for k in ("0/3", "1/3", "2/3")]
    assert set.union(*shards) == set(seen["all"]) and sum(map(len, shards)) == 12
    assert all(len(s) == 4 for s in shards)


def test_a_run_locked_by_another_process_is_skipped(synthetic_dir, tmp_path, capsys):
    import fcntl

    folder = tmp_path / "default" / "seqlora" / "tasks-agnews+SST-2" / "seed0"
    folder.mkdir(parents=True)
    with open(folder / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert run(synthetic_dir, tmp_path, "--method", "seqlora", "--tasks", "agnews,SST-2") == 0
    assert "another process is running it" in capsys.readouterr().out
    assert not (folder / "summary.json").exists()


def test_a_sweep_ends_with_the_leaderboard_of_its_results(synthetic_dir, tmp_path, monkeypatch,
                                                           capsys):
    from harness.runner import Runner
    from tests.test_table import write_summary

    monkeypatch.setattr(Runner, "run", lambda self, spec, force=False: SimpleNamespace(
        metrics={"AA": 0.0, "BWT": 0.0}, train_eval_seconds=0.0))
    args = ["run", "--all", "--methods", "seqlora,olora", "--orders", "1", "--data-dir",
            str(synthetic_dir), "--results", str(tmp_path), "--no-progress", "--jobs", "1"]
    assert main(args) == 0  # no summaries yet: no table
    assert "paper layout" not in capsys.readouterr().out
    for method, AA in (("seqlora", 40.0), ("olora", 70.0)):
        write_summary(tmp_path, method, 1, 0, AA=AA)
    assert main(args) == 0
    out = capsys.readouterr().out.split("done:")[-1]
    assert "AA (%), paper layout" in out and "| olora" in out and "70.00" in out
    assert f"report (every table, plot and run): {tmp_path / 'report' / 'index.html'}" in out
    assert "olora" in (tmp_path / "report" / "index.html").read_text()
    assert main(args + ["--shard", "0/2"]) == 0  # a shard is part of a sweep: no table
    assert "paper layout" not in capsys.readouterr().out


def test_jobs_run_the_sweep_in_parallel_processes_with_divided_threads(synthetic_dir, tmp_path):
    """--jobs 2 inside --shard 0/2: the two jobs take the shard's runs (0 and 2 of the four: 2
    methods x 2 seeds) from one queue, each in a process of its own with cores/2 threads. One job
    process is killed mid-run: the pool it breaks is replaced and every run still completes."""
    import os
    import subprocess
    import sys

    kill = {"HARNESS_KILL_AT": "train_step:2", "HARNESS_KILL_ONCE": str(tmp_path / "killed-once")}
    done = subprocess.run(
        [sys.executable, "-m", "harness", "run", "--all", "--methods", "seqlora,inclora",
         "--tasks", "agnews,SST-2", "--seeds", "0-1", "--data-dir", str(synthetic_dir),
         "--no-progress", "--results", str(tmp_path), "--train-per-task", "16",
         "--test-per-task", "8", "--shard", "0/2", "--jobs", "2"], capture_output=True, text=True,
        env={**os.environ, **kill})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "killed-once").exists() and "failed" not in done.stdout
    assert "2 run(s) (2 jobs x" in done.stdout and "2 jobs x" in done.stdout.splitlines()[-1]
    # One line per run, printed by the parent, and one header.
    assert sum(line.startswith(("seqlora", "inclora")) for line in done.stdout.splitlines()) == 2
    assert sum(line.startswith("benchmark:") for line in done.stdout.splitlines()) == 1
    summaries = sorted(tmp_path.rglob("summary.json"))
    runs = sorted((p.parts[-4], p.parts[-2]) for p in summaries)
    # The sweep order is sequence, method, seed: runs 0 and 2 are seqlora seed0 and inclora seed0.
    assert runs == [("inclora", "seed0"), ("seqlora", "seed0")]
    threads = {json.loads(p.read_text())["threads"] for p in summaries}
    assert threads == {max(1, usable_cores() // 2)}


def test_eval_scope_seen_next_keeps_every_table_metric(synthetic_dir, tmp_path):
    """--eval-scope seen+next skips only the cells no table metric reads: after stage i the tasks
    after i+1. Training is untouched, so every cell it does evaluate equals the full run's."""
    tasks = ["agnews", "SST-2", "yahoo"]
    full = run(synthetic_dir, tmp_path / "all", "--method", "seqlora", "--tasks", ",".join(tasks))
    part = run(synthetic_dir, tmp_path / "part", "--method", "seqlora", "--tasks", ",".join(tasks),
               "--eval-scope", "seen+next")
    assert full == part == 0
    seq = "tasks-" + "+".join(tasks)

    def summary(root):
        return json.loads((root / "default" / "seqlora" / seq / "seed0" / "summary.json").read_text())

    a, b = summary(tmp_path / "all"), summary(tmp_path / "part")
    missing = [(i, j) for i, row in enumerate(b["accuracy_matrix"]) for j, v in enumerate(row)
               if v is None]
    assert missing == [(1, 2)]  # after stage 1: task 3 is neither seen nor next
    for i, row in enumerate(b["accuracy_matrix"]):
        for j, v in enumerate(row):
            assert v is None or v == a["accuracy_matrix"][i][j]
    assert b["metrics"] == a["metrics"]
    assert set(b["metrics"]) >= {"AA", "LA", "BWT", "FWT", "forgetting"}
    assert all(v is not None for v in b["metrics"].values())


def test_base_row_is_the_untouched_backbone_evaluated_once_per_sweep(synthetic_dir, tmp_path,
                                                                      monkeypatch):
    """The base row is the backbone before any method's setup (here one that perturbs every
    weight), and the runs of one sweep share it: the second run re-uses the first's predictions."""
    from harness.evaluator import evaluate_task
    import harness.runner
    from harness_methods.seqft import SeqFT

    real_setup, real_evaluate, calls = SeqFT.setup, harness.runner.evaluate_task, []

    def perturbing_setup(self, ctx):
        real_setup(self, ctx)
        with torch.no_grad():
            for p in ctx.model.parameters():
                p.add_(torch.randn_like(p))

    def counting_evaluate(*args, **kwargs):
        calls.append(kwargs["data"].task.name)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(SeqFT, "setup", perturbing_setup)
    monkeypatch.setattr(harness.runner, "evaluate_task", counting_evaluate)
    assert run(synthetic_dir, tmp_path, "--all", "--methods", "seqft,seqlora",
               "--tasks", "agnews,SST-2", "--jobs", "1") == 0
    seq = tmp_path / "default" / "{}" / "tasks-agnews+SST-2" / "seed0" / "stage_00-base"
    rows = {m: json.loads((Path(str(seq).format(m)) / "metrics.json").read_text())
            for m in ("seqft", "seqlora")}
    preds = {m: (Path(str(seq).format(m)) / "predictions.jsonl").read_text()
             for m in ("seqft", "seqlora")}
    assert [rows["seqft"]["reused"], rows["seqlora"]["reused"]] == [False, True]
    assert rows["seqft"]["accuracy"] == rows["seqlora"]["accuracy"]
    assert preds["seqft"] == preds["seqlora"]
    # Base row: 2 task evaluations in all; then 2 stages x 2 tasks per run.
    assert len(calls) == 2 + 2 * 4

    from harness.runner import runner_for, Options

    runner = runner_for("default", Options(results=tmp_path, data_dir=synthetic_dir,
                                           train_per_task=32, test_per_task=8))
    backbone = load_backbone(runner.model_path())
    task = runner.benchmark.sequence(["agnews"])[0]
    batcher = Batcher(backbone, runner.profile.max_source_length, runner.profile.max_target_length)
    accuracy, _ = evaluate_task(backbone.model, batcher, runner.task_data(task),
                                batch_size=runner.profile.eval_batch_size,
                                max_new_tokens=runner.profile.max_new_tokens)
    assert rows["seqft"]["accuracy"]["agnews"] == accuracy


def test_auto_jobs_is_one_process_per_core_on_a_cpu_sweep(monkeypatch):
    """One process per core this process may use (its affinity: a Slurm allocation of 4 cores on a
    64-core node is 4), at most one per 1.5 GiB of free memory, one with a GPU."""
    import os

    import torch

    from harness.sweep import auto_jobs
    from harness.distributed import SINGLE

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 2**20,
                                                     "SC_PAGE_SIZE": 2**12}[name])  # 4 GiB free
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_jobs(72, SINGLE) == 2        # memory: 4 GiB / 1.5 GiB per process
    assert auto_jobs(1, SINGLE) == 1
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 2**22,
                                                     "SC_PAGE_SIZE": 2**12}[name])  # 16 GiB
    assert auto_jobs(72, SINGLE) == 4 and auto_jobs(3, SINGLE) == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_jobs(72, SINGLE) == 1


def test_short_free_subspace_warnings_go_to_the_run_record_and_one_printed_line(synthetic_dir,
                                                                                tmp_path):
    """A rank above the free directions left after task 1 warns at stage 2: the warning is in the
    stage's metrics.json, the summary and run.log, and the run prints one line about it (not one
    per stage among the progress bars)."""
    import json

    from tests.test_kill_resume import harness_run, run_dir as kill_run_dir

    done = harness_run(synthetic_dir, tmp_path, "inflora", extra=("--set", "lora.r=100"))
    assert done.returncode == 0, done.stderr[-2000:]
    printed = [line for line in done.stderr.splitlines() if "fewer free input directions" in line]
    assert len(printed) == 1 and "1 warning(s)" in printed[0]
    path = kill_run_dir(tmp_path, "inflora").path
    summary = json.loads((path / "summary.json").read_text())
    (warning,) = summary["warnings"]
    assert warning["stage"] == 2 and warning["task"] == "SST-2"
    assert json.loads((path / "stage_02-SST-2" / "metrics.json").read_text())["warnings"] == \
        [warning["message"]]
    assert warning["message"] in (path / "run.log").read_text()
