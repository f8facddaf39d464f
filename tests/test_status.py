"""`harness status`: each state read from the results tree alone (summary, folder lock, recorded
error, intact stage folders, recorded sweep)."""

import fcntl
import json
from types import SimpleNamespace

from harness.cli import main
from harness.status import record_sweep, sweep_status
from harness.store import STAGES, record_failure
from harness.store import LOCK, RunDir
from tests.test_table import write_summary


def started(results, method, stages_done, planned=("a", "b", "c", "d")):
    """A run folder as a runner leaves it after `stages_done` trained stages."""
    folder = results / "default" / method / "order1" / "seed0"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAGES).write_text(json.dumps(list(planned)))
    run_dir = RunDir(folder)
    for stage, task in enumerate(["base", *planned][:stages_done + 1]):
        run_dir.write_stage(f"stage_{stage:02d}-{task}", {"accuracy": {}}, [])
    return folder


def test_every_state_of_a_sweep(tmp_path, capsys):
    results = tmp_path / "results"
    write_summary(results, "seqlora", 1, 0, AA=40.0)
    started(results, "seqlora", 4)
    partial = started(results, "inclora", 2)
    failed = started(results, "ewc", 1)
    record_failure(failed, RuntimeError("CUDA out of memory\nTried to allocate 2 GiB"))
    running = started(results, "olora", 3)
    record_sweep(results, [results / "default" / m / "order1" / "seed0"
                           for m in ("seqlora", "inclora", "ewc", "olora", "lwf")], ["run", "--all"])
    with open(running / LOCK, "a") as held:  # as a runner holds it while it works
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        states = {s.run.split("/")[1]: s for s in sweep_status(results)}
        assert main(["status", "--results", str(results)]) == 0
    assert {m: (s.state, s.stages) for m, s in states.items()} == {
        "seqlora": ("complete", "4 of 4"), "olora": ("running", "3 of 4"),
        "ewc": ("failed", "1 of 4"), "inclora": ("partial", "2 of 4"), "lwf": ("not started", "-")}
    assert states["ewc"].detail == "Tried to allocate 2 GiB"  # the last line of the error
    out = capsys.readouterr().out
    assert out.strip().endswith(
        "5 runs: 1 complete, 1 running, 1 failed, 1 partial, 1 not started")
    assert "default/ewc/order1/seed0" in out and "Tried to allocate 2 GiB" in out
    assert not partial.joinpath(LOCK).exists()  # reading the status creates nothing
    after = {s.run.split("/")[1]: s.state for s in sweep_status(results)}
    assert after["olora"] == "partial"  # the lock is free again


def test_a_sweep_lists_its_runs_before_any_has_started(synthetic_dir, tmp_path, monkeypatch, capsys):
    from harness.runner import Runner

    monkeypatch.setattr(Runner, "run", lambda self, spec, force=False: SimpleNamespace(
        metrics={"AA": 0.0, "BWT": 0.0}, train_eval_seconds=0.0))
    args = ["run", "--all", "--methods", "seqlora,olora", "--orders", "1", "--seeds", "0-1",
            "--data-dir", str(synthetic_dir), "--results", str(tmp_path), "--no-progress",
            "--jobs", "1"]
    assert main(args) == 0 and main(args) == 0  # the same sweep twice: recorded once
    assert len(list((tmp_path / "sweeps").iterdir())) == 1
    capsys.readouterr()
    assert main(["status", "--results", str(tmp_path), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in runs] == [f"default/{m}/order1/seed{s}" for m in ("olora", "seqlora")
                                        for s in (0, 1)]
    assert {r["state"] for r in runs} == {"not started"}


def test_the_runs_of_a_tuning_folder_are_found_below_its_trials(tmp_path):
    """`harness tune --out OUT` keeps each trial's run in OUT/trials/<method>/trialNNN/."""
    out = tmp_path / "tune"
    started(out / "trials" / "olora" / "trial000", "olora", 4)
    started(out / "trials" / "olora" / "trial001", "olora", 1)
    assert {(s.run, s.state, s.stages) for s in sweep_status(out)} == {
        ("trials/olora/trial000/default/olora/order1/seed0", "partial", "4 of 4"),
        ("trials/olora/trial001/default/olora/order1/seed0", "partial", "1 of 4")}


def test_status_reads_the_records_and_never_checksums_a_file(tmp_path, monkeypatch):
    """A stage of a large model holds gigabytes: status counts the stages whose recorded files are
    there without reading them through (a resuming run verifies their checksums)."""
    results = tmp_path / "results"
    folder = started(results, "seqlora", 2)

    def unread(path):
        raise AssertionError(f"status read {path} through")
    monkeypatch.setattr("harness.store.sha256", unread)
    assert [(s.state, s.stages) for s in sweep_status(results)] == [("partial", "2 of 4")]
    recorded = json.loads((folder / "stage_02-b" / "metrics.json").read_text())["files"]
    (folder / "stage_02-b" / sorted(recorded)[0]).unlink()  # a recorded file gone: not counted
    assert [(s.state, s.stages) for s in sweep_status(results)] == [("partial", "1 of 4")]


def test_status_and_help_start_without_torch(tmp_path):
    """Reading a results tree needs no tensors: `status` and `--help` answer in a second, not
    after torch's import (3 s on 2 cores; `status` on 11 SmolLM2 runs took 46 s with checksums)."""
    import subprocess
    import sys

    started(tmp_path, "seqlora", 2)
    probe = ("import sys\nfrom harness.cli import main\ntry:\n    main(sys.argv[1:])\n"
             "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'")
    for args in (["status", "--results", str(tmp_path)], ["--help"]):
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
        assert "torch imported" not in done.stderr and done.returncode == 0, done.stderr[-2000:]
