"""Figures from a hand-made results tree: every file written and readable as PNG/PDF, missing
cells and joint runs handled, and the AA chart's confidence intervals around the mean."""

import json
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
import pytest

from harness import plots
from harness.summary import Summary

TASKS = ["a", "b", "c", "d"]


def make_summary(method, sequence="order1", seed=0, profile="default", kind="synthetic",
                 AA=70.0, joint=False, missing=None):
    rng = np.random.default_rng(seed)
    if joint:
        R = [[0.0] * 4, [AA] * 4]
    else:  # a task is learned at its stage and then slowly forgotten
        R = [[0.0] * 4] + [[(AA + 10 - 5 * (i - j) + rng.uniform(-2, 2)) if j < i else 0.0
                            for j in range(4)] for i in range(1, 5)]
    if missing:
        R[missing[0]][missing[1]] = None
    return Summary.from_json({"method": method, "sequence": sequence, "order": int(sequence[-1]), "seed": seed,
            "profile": profile, "tasks": TASKS, "model": "embedded",
            "benchmark": {"kind": kind, "data_dir": "/data"},
            "accuracy_matrix": R, "row_labels": ["base", "all"] if joint else ["base"] + TASKS,
            "metrics": {"AA": AA, "BWT": None if missing else -5.0},
            "stage_average_accuracy": [AA] * (1 if joint else 4)}, "test")


def write(root, summary):
    folder = root / summary.profile / summary.method / summary.sequence / f"seed{summary.seed}"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary.to_json()))


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "results"
    for seed in range(3):
        for order in (1, 2):
            write(root, make_summary("olora", f"order{order}", seed, AA=70 + order + seed))
            write(root, make_summary("seqlora+sam", f"order{order}", seed, AA=50 + 2 * seed))
    write(root, make_summary("inclora", "order1", 0, AA=60.0, missing=(3, 1)))
    write(root, make_summary("mtl", "order1", 0, AA=80.0, joint=True))
    write(root, make_summary("olora", "order1", 0, profile="real", kind="real", AA=40.0))
    (root / "default" / "olora" / "order3" / "seed0").mkdir(parents=True)  # still running
    return root


def assert_figures(paths):
    assert paths and len(paths) % 2 == 0
    for path in paths:
        assert path.is_file() and path.stat().st_size > 0, path
        head = path.read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" if path.suffix == ".png" else head.startswith(b"%PDF")


def test_heatmap_with_missing_cell_and_joint_run(tmp_path):
    paths = plots.accuracy_heatmap(make_summary("inclora", missing=(3, 1)), tmp_path / "h")
    assert [p.name for p in paths] == ["h.png", "h.pdf"]
    assert_figures(paths)
    assert_figures(plots.accuracy_heatmap(make_summary("mtl", joint=True), tmp_path / "j"))


def test_forgetting_curves(tmp_path):
    runs = [make_summary("olora", seed=s) for s in range(3)]
    assert_figures(plots.forgetting_curves(runs, tmp_path / "many"))
    assert_figures(plots.forgetting_curves(runs[:1], tmp_path / "one"))
    assert_figures(plots.forgetting_curves([make_summary("inclora", missing=(4, 0))],
                                           tmp_path / "gap"))
    with pytest.raises(ValueError, match="joint run"):
        plots.forgetting_curves([make_summary("mtl", joint=True)], tmp_path / "joint")
    with pytest.raises(ValueError, match="one method and sequence"):
        plots.forgetting_curves([runs[0], make_summary("inclora")], tmp_path / "mixed")


def test_aa_with_ci_draws_points_without_ci(tmp_path):
    table = pd.DataFrame({"method": ["a", "b"], "mean": [70.0, 60.0],
                          "ci_low": [65.0, np.nan], "ci_high": [75.0, np.nan]})
    assert_figures(plots.aa_with_ci(table, tmp_path / "aa", "AA"))
    assert_figures(plots.aa_with_ci(table.iloc[1:], tmp_path / "aa_no_ci", "AA"))
    with pytest.raises(ValueError, match="ci_low"):
        plots.aa_with_ci(table.drop(columns="ci_low"), tmp_path / "bad", "AA")
    with pytest.raises(ValueError, match="no method"):
        plots.aa_with_ci(table.iloc[:0], tmp_path / "empty", "AA")


def test_bootstrap_ci():
    low, high = plots.bootstrap_ci([70.0, 72.0, 75.0, 71.0])
    assert low < np.mean([70, 72, 75, 71]) < high
    assert all(np.isnan(plots.bootstrap_ci([70.0])))
    assert all(np.isnan(plots.bootstrap_ci([70.0, 70.0, 70.0])))
    assert plots.bootstrap_ci([1.0, 2.0, 4.0]) == plots.bootstrap_ci([1.0, 2.0, 4.0])  # seeded


def test_write_all(tree, tmp_path, monkeypatch):
    charts = {}
    draw = plots.aa_with_ci

    def spy(table, out_stem, title, formats):
        charts[out_stem.name] = table
        return draw(table, out_stem, title, formats)

    monkeypatch.setattr(plots, "aa_with_ci", spy)
    out = tmp_path / "figures"
    paths = plots.write_all(tree, out)
    assert_figures(paths)
    names = {p.relative_to(out).as_posix() for p in paths}
    stems = {n.rsplit(".", 1)[0] for n in names}
    assert {"heatmaps/default-seqlora+sam-order2-seed1", "heatmaps/default-mtl-order1-seed0",
            "heatmaps/real-olora-order1-seed0", "forgetting/default-olora-order1",
            "forgetting/default-seqlora+sam-order2", "forgetting/default-inclora-order1",
            "aa_default_synthetic", "aa_real_real"} <= stems
    assert not any("mtl" in s for s in stems if s.startswith("forgetting/"))  # joint: no curves
    assert len(stems) == 15 + 6 + 2  # heatmaps (one per complete run), curves, AA charts

    table = charts["aa_default_synthetic"].set_index("method")
    assert list(table.index) == ["inclora", "olora", "mtl", "seqlora+sam"]  # paper order, then others
    for method in ("olora", "seqlora+sam"):
        row = table.loc[method]
        assert row["n"] == 6 and row["ci_low"] < row["mean"] < row["ci_high"]
    assert table.loc["olora", "mean"] == pytest.approx(np.mean([71, 72, 72, 73, 73, 74]))
    for method in ("inclora", "mtl"):  # one run: no interval
        assert np.isnan(table.loc[method, ["ci_low", "ci_high"]].astype(float)).all()

    only_real = plots.write_all(tree, tmp_path / "real", profile="real")
    assert {p.name for p in only_real} >= {"aa_real_real.png", "aa_real_real.pdf"}
    assert len(only_real) == 2 * 3


def test_heatmap_draws_the_format_matrix_beside_r_when_the_run_has_one(tmp_path):
    from PIL import Image

    plain = make_summary("olora")
    with_format = make_summary("olora")
    with_format.format_matrix = [[100.0 - v if v is not None else None for v in row]
                                 for row in with_format.accuracy_matrix]
    widths = [Image.open(plots.accuracy_heatmap(s, tmp_path / name)[0]).size[0]
              for s, name in ((plain, "r"), (with_format, "ro"))]
    assert widths[1] > 1.7 * widths[0]  # two panels


def test_figures_drawn_side_by_side_are_those_drawn_in_one_process(tree, tmp_path, monkeypatch):
    """Above `PER_PROCESS` figures a process each, they are drawn in a pool of processes; the
    same figures come back in the same order, with the same pixels."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    serial = list(plots.draw_all(tree, tmp_path / "one", formats={".png": 50}))
    monkeypatch.setattr(plots, "PER_PROCESS", 4)  # 21 figures: two processes
    pools = []
    monkeypatch.setattr(plots, "ProcessPoolExecutor",
                        lambda *a, **k: pools.append(a) or ProcessPoolExecutor(*a, **k))
    pooled = list(plots.draw_all(tree, tmp_path / "pool", formats={".png": 50}))
    assert [a[0] for a in pools] == [2]
    assert [(k, m, [p.relative_to(tmp_path / "pool") for p in ps]) for k, m, ps in pooled] == \
        [(k, m, [p.relative_to(tmp_path / "one") for p in ps]) for k, m, ps in serial]
    for (_, _, a), (_, _, b) in zip(serial, pooled):
        assert a[0].read_bytes() == b[0].read_bytes()
