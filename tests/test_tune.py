"""`harness tune`: every method gets the same trials and budget, each trial is scored on records
of train.json (never the test split), the best trial's settings are what `tuned.json` holds, and
`run --tuned` applies them, records them and keeps such runs apart in the tables."""

import json
import multiprocessing
import time

import numpy as np
import pandas as pd
import pytest

from harness import data, table
from harness.cli import main
from harness.store import RunSpec
from harness.summary import read_summaries

BUDGET = ["--tasks", "agnews,SST-2", "--train-per-task", "16", "--test-per-task", "8",
          "--no-progress"]


@pytest.fixture(scope="module")
def tuned(synthetic_dir, tmp_path_factory):
    """Two methods x 2 trials, with the test split made unreadable. The learning rates' range
    leaves out the config files' (2e-3), so that a tuned run's differs from a plain one's."""
    out = tmp_path_factory.mktemp("tune")
    real = data.read_labelled

    def train_only(data_dir, task, split, drop_unlabelled):
        assert split != "test", "tuning read the test split"
        return real(data_dir, task, split, drop_unlabelled)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "read_labelled", train_only)
        assert main(["tune", "--methods", "seqlora,olora", "--trials", "2", "--lr-range",
                     "3e-3,3e-2", "--data-dir", str(synthetic_dir), "--out", str(out), *BUDGET]) == 0
    return out


def test_each_method_gets_the_same_trials_and_keeps_its_best(tuned):
    result = json.loads((tuned / "tuned.json").read_text())
    assert result["setup"]["split"] == "heldout" and result["setup"]["trials"] == 2
    for method, keys in (("seqlora", {"lr"}), ("olora", {"lr", "lambda1"})):
        chosen = result["methods"][method]
        assert chosen["trials"] == 2 and set(chosen["settings"]) == keys
        assert 3e-3 <= chosen["settings"]["lr"] <= 3e-2
        trials = {}
        for folder in (tuned / "trials" / method).iterdir():  # the trials' run folders
            [s] = read_summaries(folder)
            assert s.benchmark["split"] == "heldout"
            # AA alone is scored: the rows between the base row and the last are not evaluated
            assert s.metrics["LA"] is None and not np.isnan(s.accuracy_matrix[-1]).any()
            trials[folder.name] = (s.metrics["AA"], s.tuned)
        assert len(trials) == 2
        listed = pd.read_csv(tuned / "trials" / f"{method}.csv")  # every trial, for pandas
        assert listed["state"].tolist() == ["COMPLETE"] * 2
        assert sorted(listed["heldout_AA"]) == pytest.approx(sorted(aa for aa, _ in trials.values()))
        assert listed["config_file"].tolist() == [method == "olora", False]  # seqlora's own lr
        # lies outside the searched range
        best_AA = max(aa for aa, _ in trials.values())
        assert chosen["heldout_AA"] == pytest.approx(best_AA)
        assert trials[f"trial{chosen['trial']:03d}"] == (pytest.approx(best_AA), chosen["settings"])


def test_the_choices_table_sets_each_choice_beside_the_config_files_settings(tuned):
    """tuned.md: per method the config file's settings (trial 1, when inside the ranges) and the
    chosen ones, each with its held-out AA, as tuned.json records them."""
    result = json.loads((tuned / "tuned.json").read_text())
    olora = result["methods"]["olora"]
    assert olora["config_file"]["settings"]["lambda1"] == 0.5  # its config file's, trial 1
    assert "config_file" not in result["methods"]["seqlora"]  # its own lr lies outside the range
    text = (tuned / "tuned.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["seqlora"][0] == "outside the searched ranges"
    assert rows["olora"][1] == f"{olora['config_file']['heldout_AA']:.2f}"
    assert rows["olora"][3] == f"{olora['heldout_AA']:.2f}"
    assert rows["olora"][4] == f"{olora['trial'] + 1} of 2"


def test_the_trials_table_shows_a_queued_trials_settings(tmp_path):
    """Before the config file's trial has run, its row names its settings (Optuna keeps a queued
    trial's settings apart from the params of a trial that ran)."""
    import optuna

    from harness import tune

    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"lr": 3e-4, "lambda1": 0.5}, user_attrs={"config_file": True})
    tune.write_trials(tmp_path / "olora.csv", study)
    [row] = pd.read_csv(tmp_path / "olora.csv").to_dict("records")
    assert (row["state"], row["params_lr"], row["params_lambda1"]) == ("WAITING", 3e-4, 0.5)
    assert row["config_file"] and np.isnan(row["heldout_AA"])


def test_a_shared_study_is_continued_not_repeated_and_another_setup_is_refused(tuned, synthetic_dir,
                                                                              capsys):
    before = (tuned / "tuned.json").read_text()
    argv = ["tune", "--methods", "seqlora", "--trials", "2", "--lr-range", "3e-3,3e-2",
            "--data-dir", str(synthetic_dir), "--out", str(tuned), *BUDGET]
    (tuned / "trials" / "seqlora.csv").unlink()
    assert main(argv) == 0  # its 2 trials are complete: nothing runs again
    assert len(list((tuned / "trials" / "seqlora").iterdir())) == 2
    assert len(pd.read_csv(tuned / "trials" / "seqlora.csv")) == 2  # listed again all the same
    assert json.loads((tuned / "tuned.json").read_text()) == json.loads(before)
    capsys.readouterr()
    assert main([*argv[:4], "3", *argv[5:]]) == 2
    assert "tuned with other settings (trials)" in capsys.readouterr().err


def test_a_study_continues_from_the_same_data_in_another_folder_not_from_other_data(
        tuned, synthetic_dir, tmp_path, capsys):
    """Machines sharing a study name one data by different paths: the study records the data's
    digest and continues from a copy elsewhere; a copy with one task's train.json changed is
    refused, before anything is written."""
    import shutil

    before = (tuned / "tuned.json").read_text()
    copy = tmp_path / "elsewhere"
    shutil.copytree(synthetic_dir, copy)
    argv = ["tune", "--methods", "seqlora", "--trials", "2", "--lr-range", "3e-3,3e-2",
            "--data-dir", str(copy), "--out", str(tuned), *BUDGET]
    assert main(argv) == 0
    assert len(list((tuned / "trials" / "seqlora").iterdir())) == 2  # nothing ran again
    assert (tuned / "tuned.json").read_text() == before
    train = copy / "TC" / "agnews" / "train.json"
    train.write_text(train.read_text().replace("}", " }", 1))  # one record, one space more
    capsys.readouterr()
    assert main(argv) == 2
    assert "tuned with other settings (data)" in capsys.readouterr().err
    assert (tuned / "tuned.json").read_text() == before
    from harness.tune import setup_changes

    old = {"data_dir": "/a", "trials": 2}  # recorded before digests: compared by folder
    assert setup_changes(old, {**old, "data": "f00d"}) == []
    assert setup_changes(old, {"data_dir": "/b", "trials": 2, "data": "f00d"}) == ["data_dir"]


def test_run_tuned_applies_and_records_the_settings_and_the_table_marks_them(tuned, synthetic_dir,
                                                                            tmp_path):
    chosen = json.loads((tuned / "tuned.json").read_text())["methods"]["olora"]["settings"]
    results = tmp_path / "results"
    for extra in ([], ["--tuned", str(tuned / "tuned.json")]):
        assert main(["run", "--method", "olora", "--results", str(results),
                     "--data-dir", str(synthetic_dir), *BUDGET, *extra]) == 0
    spec = RunSpec(method="olora", tasks=("agnews", "SST-2"), seed=0, profile="default")
    config = json.loads((spec.folder(results, tuned=True) / "config.json").read_text())
    assert config["tuned"] == chosen
    assert {k: config["method_config"][k] for k in chosen} == chosen
    plain = json.loads((spec.folder(results) / "config.json").read_text())
    assert "tuned" not in plain and plain["method_config"]["lr"] != chosen["lr"]
    rows = table.load_summaries(results).set_index("method")
    assert sorted(rows.index) == ["olora", "olora (tuned)"]
    assert "(tuned): settings chosen by `harness tune`" in table.full_tables(
        table.load_summaries(results), fmt="github")


class ScoredRuns:
    """A runner whose run's AA is a known function of the trial's settings: what `tune_method`
    does with the scores, without training."""

    def __init__(self, score):
        from harness.runner import Options

        self.options, self.score, self.seen, self.folders = Options(), score, [], []

    def run(self, spec):
        from types import SimpleNamespace

        settings = self.options.tuned[spec.method]
        self.seen.append(dict(settings))
        self.folders.append(self.options.results.name)
        return SimpleNamespace(metrics={"AA": self.score(settings)})


def test_the_best_of_exactly_the_budgeted_trials_is_chosen(tmp_path):
    from harness import tune

    runner = ScoredRuns(lambda s: -abs(s["lr"] - 3e-3) * 1e3 - abs(s["lambda1"] - 0.1))
    setup = {"profile": "default", "seed": 0, "trials": 6, "lr_range": [1e-5, 1e-2]}
    storage = tune.open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    sequences = [(1, ("a", "b")), (2, ("b", "a"))]  # AA is averaged over the sequences
    result = tune.tune_method(runner, "olora", sequences, setup, storage, tmp_path)
    assert len(runner.seen) == 6 * 2 and result["trials"] == 6
    assert all(1e-5 <= s["lr"] <= 1e-2 and 1e-3 <= s["lambda1"] <= 10 for s in runner.seen)
    best = max(runner.seen, key=runner.score)
    assert result["settings"] == best and result["heldout_AA"] == pytest.approx(runner.score(best), abs=1e-4)
    assert runner.options.tuned is None  # the runner's own options are restored


def test_a_study_starts_from_the_methods_own_settings(tmp_path):
    """Trial 1 is the config file's values (with `--set method.*`): a method whose own settings
    score best on the held-out split keeps them; a value outside its searched range is drawn."""
    from harness import tune
    from harness_methods import registry

    own = registry.method_config("olora", "default")
    runner = ScoredRuns(lambda s: -abs(s["lr"] - own["lr"]) - abs(s["lambda1"] - own["lambda1"]))
    setup = {"profile": "default", "seed": 0, "trials": 3, "lr_range": [1e-5, 1e-2]}
    storage = tune.open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    result = tune.tune_method(runner, "olora", [(1, ("a", "b"))], setup, storage, tmp_path)
    assert runner.seen[0] == {"lr": own["lr"], "lambda1": own["lambda1"]}
    assert result["settings"] == runner.seen[0] and result["trial"] == 0
    assert len({s["lr"] for s in runner.seen}) == 3  # the other trials are drawn

    space = {"lr": (1e-5, own["lr"] / 2), "lambda1": (1e-3, 10.0)}
    assert tune.config_trial("olora", "default", space) == {"lambda1": own["lambda1"]}
    assert tune.config_trial("olora", "default", space, ("method.lambda1=0.25",)) == {"lambda1": 0.25}
    memory = registry.method_config("ogd", "default")["memory_size"]
    assert tune.config_trial("ogd", "default", {"memory_size": (20, 500)}) == {"memory_size": memory}


def test_a_method_coefficient_is_searched_with_its_type():
    """An integer setting (OGD's memory size) is drawn over the integers, a float one over the
    reals, each within its bounds; the learning rate's range is the same for every method."""
    import optuna

    from harness.tune import search_space, suggest

    space = search_space("ogd", "default", (1e-4, 1e-2))
    assert space == {"lr": (1e-4, 1e-2), "memory_size": (20, 500)}
    trial = optuna.create_study().ask()
    values = {k: suggest(trial, k, low, high) for k, (low, high) in space.items()}
    assert isinstance(values["memory_size"], int) and 20 <= values["memory_size"] <= 500
    assert isinstance(values["lr"], float) and 1e-4 <= values["lr"] <= 1e-2
    assert search_space("agem", "default", (1e-4, 1e-2))["memory_fraction"] == (0.005, 0.2)
    pinned = search_space("ogd", "default", (1e-4, 1e-2), {"memory_size": (100.0, 100.0)})
    assert pinned["memory_size"] == (100, 100)  # --range parses floats; a count stays a count
    assert suggest(trial, "pinned", *pinned["memory_size"]) == 100


FORK = multiprocessing.get_context("fork")  # no imports to repeat: the processes start at once


def in_processes(target, *args_each):
    """`target(*args)` in one forked process per args tuple, all started together; the processes,
    ended."""
    processes = [FORK.Process(target=target, args=args) for args in args_each]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    return processes


def _open_together(barrier, url, answers):
    from harness import tune
    from harness.errors import HarnessError

    barrier.wait()
    try:
        tune.open_storage(url)
        answers.put("ok")
    except HarnessError as exc:
        answers.put(str(exc))


def test_processes_starting_together_on_a_new_storage_all_open_it(tmp_path):
    """Four processes released at once on a database none has made: every one opens it (the
    losers of the race to create its tables, 2-3 of 4 here without the retry, try again)."""
    import optuna  # noqa: F401  (imported before the fork: the processes start at once)

    barrier, answers = FORK.Barrier(4), FORK.Queue()
    url = f"sqlite:///{tmp_path / 'study.db'}"
    in_processes(_open_together, *[(barrier, url, answers)] * 4)
    assert [answers.get() for _ in range(4)] == ["ok"] * 4


class KilledRuns(ScoredRuns):
    """A runner whose process is killed (SIGKILL) in the middle of its first run, once the
    trial's heartbeat has been recorded."""

    def run(self, spec):
        import os
        import signal

        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)


def _tune_and_die(storage_url, setup, out):
    from harness import tune

    tune.tune_method(KilledRuns(None), "olora", [(1, ("a", "b"))], setup,
                     tune.open_storage(storage_url), out)


def test_a_killed_trial_is_run_again_with_its_settings_in_its_own_folder(tmp_path, monkeypatch):
    """A process killed in the middle of a trial (the config file's, here): once its heartbeat
    is older than the grace period, the next process runs that trial's settings again in that
    trial's folder (where its runs resume from their checkpoints), then draws the others."""
    from harness import tune
    from harness_methods import registry

    monkeypatch.setattr(tune, "HEARTBEAT_S", 1)
    monkeypatch.setattr(tune, "GRACE_S", 1)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    setup = {"profile": "default", "seed": 0, "trials": 2, "lr_range": [1e-5, 1e-2]}
    [killed] = in_processes(_tune_and_die, (url, setup, tmp_path))
    assert killed.exitcode == -9
    time.sleep(2 * tune.GRACE_S)  # its last heartbeat is now older than the grace period

    own = registry.method_config("olora", "default")
    runner = ScoredRuns(lambda s: -abs(s["lr"] - own["lr"]))  # the config file's trial is best
    result = tune.tune_method(runner, "olora", [(1, ("a", "b"))], setup, tune.open_storage(url),
                              tmp_path)
    assert runner.seen[0] == {"lr": own["lr"], "lambda1": own["lambda1"]}
    assert runner.folders == ["trial000", "trial002"]  # trial 1 was the killed one's rerun
    assert result["trials"] == 2 and result["trial"] == 0  # named by its folder, not its rerun
    assert tune.chosen_trial(result) == "1 of 2"


def test_the_chosen_trial_after_a_killed_one_is_counted_among_the_complete_ones():
    """tuned.md's "chosen trial": the rank among the complete trials, with the folder where a
    killed attempt took a number (the third complete trial ran in trial003)."""
    from harness import tune

    assert tune.chosen_trial({"trial": 3, "rank": 3, "trials": 4}) == "3 of 4 (trial003)"
    assert tune.chosen_trial({"trial": 2, "rank": 3, "trials": 4}) == "3 of 4"
    assert tune.chosen_trial({"trial": 2, "trials": 4}) == "3 of 4"  # a file from before ranks


def _write_results(path, setup, names):
    from harness import tune

    for name in names:
        tune.write_tuned(path, setup, name, {"settings": {"lr": 1e-3}, "heldout_AA": 50.0,
                                             "trial": 0, "trials": 1})


def test_processes_sharing_a_folder_keep_each_others_results(tmp_path):
    """Two processes adding methods to one tuned.json at once: every method is kept (each reads
    what the other wrote), in the table beside it too."""
    setup = {"profile": "default", "seed": 0, "trials": 1, "lr_range": [1e-5, 1e-2]}
    path = tmp_path / "tuned.json"
    names = [[f"m{k}{i}" for i in range(40)] for k in range(2)]
    in_processes(_write_results, *[(path, setup, n) for n in names])
    assert sorted(json.loads(path.read_text())["methods"]) == sorted(names[0] + names[1])
    assert all(f"| {n} " in (tmp_path / "tuned.md").read_text() for n in names[0] + names[1])
