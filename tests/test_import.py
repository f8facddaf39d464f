"""`harness import olora`: O-LoRA-style output folders read into the results store."""

import json

import pytest

from harness.cli import main

ORDER1 = ["dbpedia", "amazon", "yahoo", "agnews"]
# Accuracy (%) after each stage on the tasks seen so far, as the O-LoRA family evaluates.
STAGES = {1: {"dbpedia": 98.0},
          2: {"dbpedia": 96.0, "amazon": 52.0},
          3: {"dbpedia": 94.0, "amazon": 50.0, "yahoo": 70.0},
          4: {"dbpedia": 90.0, "amazon": 48.0, "yahoo": 66.0, "agnews": 88.0}}


def write_stage(source, stage, values, task=None, text=None):
    folder = source / f"{stage}-{task or ORDER1[stage - 1]}"
    folder.mkdir(parents=True)
    # The keys those codebases write besides the per-task exact match, including the
    # per-category averages (TC, SC), which are not tasks.
    results = {"epoch": 1.0, "predict_exact_match": 50.0, "predict_exact_match_for_TC": 81.1,
               "predict_exact_match_for_SC": 50.5, "train_loss": 0.3,
               **{f"predict_exact_match_for_{t}": v for t, v in values.items()},
               **{f"predict_rougeL_for_{t}": 100.0 for t in values}}
    path = folder / "all_results.json"
    path.write_text(text if text is not None else json.dumps(results, indent=4))
    return path


def olora_output(root, stages=(1, 2, 3, 4)):
    source = root / "outputs"
    source.mkdir()
    for stage in stages:
        write_stage(source, stage, STAGES[stage])
    return source


def run_import(source, results, *extra):
    return main(["import", "olora", str(source), "--method", "olora", "--order", "1",
                 "--results", str(results), *extra])


def summary_of(results, method="olora"):
    return json.loads((results / "default" / method / "order1" / "seed0" / "summary.json").read_text())


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))} if root.exists() else None


def test_complete_import(tmp_path, capsys):
    results = tmp_path / "results"
    assert run_import(olora_output(tmp_path), results) == 0
    run_dir = results / "default" / "olora" / "order1" / "seed0"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "accuracy_matrix.csv", "config.json", "stage_01-dbpedia", "stage_02-amazon",
        "stage_03-yahoo", "stage_04-agnews", "summary.json"]
    assert not list(run_dir.parent.glob(".*"))  # no temporary folder left
    config = json.loads((run_dir / "config.json").read_text())
    assert config["source"] == "olora" and config["imported_from"] == str(tmp_path / "outputs")
    assert config["benchmark"]["kind"] == "real" and len(config["fingerprint"]) == 16
    assert config["run"] == {"method": "olora", "tasks": ORDER1, "seed": 0, "profile": "default",
                             "order": 1}
    metrics = json.loads((run_dir / "stage_03-yahoo" / "metrics.json").read_text())
    files = metrics.pop("files")  # checksums of the stage's files
    assert metrics == {"stage": 3, "task": "yahoo", "accuracy": STAGES[3], "imported": True}
    assert list(files) == ["predictions.jsonl"]
    assert (run_dir / "stage_03-yahoo" / "predictions.jsonl").read_text() == ""

    summary = summary_of(results)
    m = summary["metrics"]
    assert m["AA"] == pytest.approx((90 + 48 + 66 + 88) / 4)                     # 73.0
    assert m["BWT"] == pytest.approx(((90 - 98) + (48 - 52) + (66 - 70)) / 3, abs=1e-4)
    assert m["LA"] == pytest.approx((98 + 52 + 70 + 88) / 4)
    assert m["FWT"] is None                      # no base row in those codebases
    assert summary["missing_stages"] == [0]
    assert summary["accuracy_matrix"][1] == [98.0, None, None, None]  # unseen tasks: missing
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].split() == ["olora", "order1", "seed0", "AA", "73.00", "BWT", "-5.33",
                               "(imported)"]


@pytest.mark.parametrize("how", ["no folder", "no all_results.json"])
def test_missing_stage(tmp_path, caplog, capsys, how):
    source = olora_output(tmp_path, stages=(1, 2, 4))
    if how == "no all_results.json":  # a stage that started and never finished
        (source / "3-yahoo").mkdir()
    results = tmp_path / "results"
    with caplog.at_level("INFO", logger="harness"):
        assert run_import(source, results) == 0
    assert "imported 3 of 4 stages" in caplog.text and "missing: 3-yahoo" in caplog.text
    summary = summary_of(results)
    assert summary["accuracy_matrix"][3] == [None] * 4
    assert summary["missing_stages"] == [0, 3]
    assert summary["metrics"]["AA"] == pytest.approx(73.0)
    assert summary["metrics"]["BWT"] is None     # needs R[3][yahoo], the missing stage's diagonal
    assert "BWT missing" in capsys.readouterr().out


def test_imported_run_shows_in_tables(tmp_path):
    from harness.table import load_summaries

    results = tmp_path / "results"
    assert run_import(olora_output(tmp_path), results) == 0
    df = load_summaries(results)
    row = df[(df.method == "olora") & (df.order == 1)]
    assert len(row) == 1 and row.iloc[0]["AA"] == pytest.approx(73.0)
    assert row.iloc[0]["kind"] == "real"


def test_force_replaces_an_earlier_import(tmp_path):
    results = tmp_path / "results"
    assert run_import(olora_output(tmp_path), results) == 0
    other = tmp_path / "other"
    write_stage(other, 1, {"dbpedia": 10.0})
    assert run_import(other, results, "--force") == 0
    summary = summary_of(results)
    assert summary["accuracy_matrix"][1][0] == 10.0 and summary["missing_stages"] == [0, 2, 3, 4]
    run_dir = results / "default" / "olora" / "order1" / "seed0"
    assert not (run_dir / "stage_04-agnews").exists()
    assert not list(run_dir.parent.glob(".*"))


def _bad_folder(tmp_path, case):
    """An output folder with one problem; returns (source, the path the error must name)."""
    source = tmp_path / "outputs"
    if case == "missing":
        return source, source
    if case == "a file":
        source.write_text("")
        return source, source
    source.mkdir()
    if case == "empty":
        return source, source
    write_stage(source, 1, STAGES[1])
    if case == "bad name":
        (source / "dbpedia").mkdir()
        return source, source / "dbpedia"
    if case == "task not in order":
        return source, write_stage(source, 2, {}, task="MNLI").parent
    if case == "wrong position":
        return source, write_stage(source, 2, {}, task="yahoo").parent
    if case == "stage out of range":
        return source, write_stage(source, 5, {}, task="agnews").parent
    if case == "malformed JSON":
        return source, write_stage(source, 2, {}, text='{\n  "predict_exact_match_for_amazon": ,\n}')
    if case == "not a number":
        return source, write_stage(source, 2, {"amazon": "52.0"})
    if case == "over 100":
        return source, write_stage(source, 2, {"amazon": 101.5})
    if case == "NaN":
        return source, write_stage(source, 2, {}, text='{"predict_exact_match_for_amazon": NaN}')
    if case == "key for another task":
        return source, write_stage(source, 2, {"amazon": 52.0, "MNLI": 40.0})
    raise AssertionError(case)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder"),
    ("a file", "not a folder"),
    ("empty", "no stage folders"),
    ("bad name", "not a stage folder"),
    ("task not in order", "'MNLI' is not in order 1"),
    ("wrong position", "yahoo is stage 3 of order 1, not stage 2"),
    ("stage out of range", "agnews is stage 4 of order 1, not stage 5"),
    ("malformed JSON", "malformed JSON at line 2, column 37"),
    ("not a number", 'predict_exact_match_for_amazon = "52.0"'),
    ("over 100", "predict_exact_match_for_amazon = 101.5"),
    ("NaN", "predict_exact_match_for_amazon = NaN"),
    ("key for another task", "'MNLI' is not a task of order 1"),
])
def test_bad_output_folder_exits_2_and_writes_nothing(tmp_path, capsys, case, message):
    source, named = _bad_folder(tmp_path, case)
    results = tmp_path / "results"
    assert run_import(source, results) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(named) in err
    assert not results.exists()


@pytest.mark.parametrize("argv, message", [
    (["--order", "9"], "--order 9: unknown order"),
    (["--order", "1", "--seed", "-1"], "--seed -1"),
    (["--order", "1", "--profile", "nope"], "unknown profile 'nope'"),
    (["--order", "x"], "--order: invalid int value"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    source = olora_output(tmp_path)
    results = tmp_path / "results"
    assert main(["import", "olora", str(source), "--method", "olora", "--results", str(results),
                 *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not results.exists()


def test_existing_run_is_refused_without_force(tmp_path, capsys):
    results = tmp_path / "results"
    assert run_import(olora_output(tmp_path), results) == 0
    before = tree(results)
    other = tmp_path / "other"
    write_stage(other, 1, {"dbpedia": 10.0})
    capsys.readouterr()
    assert run_import(other, results) == 2
    err = capsys.readouterr().err.strip()
    run_dir = results / "default" / "olora" / "order1" / "seed0"
    assert len(err.splitlines()) == 1 and str(run_dir) in err and "--force" in err
    assert tree(results) == before
    # A bad folder with --force fails before the existing run is touched.
    write_stage(other, 2, {"amazon": 101.0})
    assert run_import(other, results, "--force") == 2
    assert tree(results) == before


def test_stages_of_another_order_are_refused_naming_the_order_they_are(tmp_path, capsys):
    """Sequences are matched by content: the O-LoRA repository's "order 4" script runs order 6."""
    from harness.benchmark import load_benchmark

    order6 = load_benchmark().orders[6]
    source = tmp_path / "outputs"
    for stage, task in enumerate(order6[:2], 1):
        write_stage(source, stage, {task: 50.0}, task=task)
    assert main(["import", "olora", str(source), "--method", "olora", "--order", "4",
                 "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert "these stages are those of order 6 (SAPT order 4, GainLoRA order 3, O-LoRA repository " \
           "scripts order 4)" in err
    assert not (tmp_path / "results").exists()
