"""Leaderboards from a hand-made results tree: the paper layout's cells and averages, the full
table's marks, the comparison with published numbers, and the files `table --out` writes."""

import json
import subprocess
import sys
from importlib.metadata import EntryPoint

import pandas as pd
import pytest

from harness import table
from harness.cli import main


def write_summary(root, method, order, seed, AA, BWT=-5.0, profile="default", kind="synthetic",
                  data_dir="/data"):
    folder = root / profile / method / f"order{order}" / f"seed{seed}"
    folder.mkdir(parents=True)
    R = [[0.0] * 4] + [[AA] * 4 for _ in range(4)]
    (folder / "summary.json").write_text(json.dumps({
        "method": method, "sequence": f"order{order}", "order": order, "seed": seed,
        "profile": profile, "model": "embedded", "tasks": ["a", "b", "c", "d"],
        "benchmark": {"kind": kind, "data_dir": data_dir},
        "metrics": {"AA": AA, "BWT": BWT, "FWT": 0.0, "forgetting": -BWT, "LA": AA},
        "parameter_metrics": {"ACR": 0.5, "GSR_hoyer": 0.7, "OO": 1e-3},
        "accuracy_matrix": R, "row_labels": ["base", "a", "b", "c", "d"]}))


def published_numbers(tmp_path, *rows: str):
    """A baselines folder with one CSV of published numbers (`rows`, below its header)."""
    baselines = tmp_path / "baselines"
    baselines.mkdir()
    (baselines / "published.csv").write_text(
        "paper,arxiv_id,table,model,method,metric,order,value\n" + "".join(r + "\n" for r in rows))
    return baselines


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "results"
    for order in range(1, 7):
        for seed in range(3):
            write_summary(root, "olora", order, seed, AA=70 + order + seed * 0.1)
            write_summary(root, "seqlora", order, seed, AA=40 + order + seed * 0.3)
            # within noise of olora: paired differences 0.3, -0.4, 0.05
            write_summary(root, "inclora", order, seed,
                          AA=70 + order + seed * 0.1 + [0.3, -0.4, 0.05][seed])
    return root


def test_paper_layout_cells_and_group_averages(tree):
    text = table.paper_table(table.load_summaries(tree), fmt="csv")
    lines = {l.split(",")[0]: l.split(",")[1:] for l in text.splitlines()[2:]}
    header = text.splitlines()[1].split(",")[1:]
    assert header == ["Order 1", "Order 2", "Order 3", "Avg 1-3", "Order 4", "Order 5", "Order 6",
                      "Avg 4-6"]
    olora = [float(x) for x in lines["olora"]]
    assert olora[0] == pytest.approx(71.1)  # mean of seeds 71.0, 71.1, 71.2
    assert olora[3] == pytest.approx((71.1 + 72.1 + 73.1) / 3)
    assert list(lines) == ["seqlora", "inclora", "olora"]  # the papers' row order
    assert "seeds per cell 3-3" in text.splitlines()[0]


def test_runs_of_one_benchmark_at_two_paths_share_a_table(tmp_path):
    # Two machines mounting the benchmark at different paths: one table, titled by its folder's
    # name; another folder name is another benchmark.
    root = tmp_path / "results"
    write_summary(root, "olora", 1, 0, AA=70, data_dir="/scratch/user/CL_Benchmark")
    write_summary(root, "seqlora", 1, 0, AA=40, data_dir="/home/user/data/CL_Benchmark")
    write_summary(root, "inclora", 1, 0, AA=50, data_dir="/home/user/data/CL_Benchmark-v2")
    titles = [l for l in table.paper_table(table.load_summaries(root)).splitlines() if "(%)" in l]
    assert len(titles) == 2 and "benchmark synthetic (CL_Benchmark);" in titles[0]
    assert "/" not in titles[0].split("benchmark")[1]


def test_a_full_tables_title_names_the_orders_its_runs_cover(tree, tmp_path):
    titles = [l for l in table.full_tables(table.load_summaries(tree)).splitlines() if "best:" in l]
    assert [t.split(";")[0] for t in titles] == ["orders 1-3", "orders 4-6"]
    root = tmp_path / "partial"
    for order in (1, 4, 6):
        write_summary(root, "olora", order, 0, AA=70)
    titles = [l for l in table.full_tables(table.load_summaries(root)).splitlines() if "best:" in l]
    assert [t.split(";")[0] for t in titles] == ["order 1", "orders 4, 6"]


def test_full_table_marks_best_and_ties(tree):
    text = table.full_tables(table.load_summaries(tree), fmt="github", reference="seqlora")
    block = text.split("orders 4-6")[0]
    row = {l.split("|")[1].strip(): l for l in block.splitlines() if l.startswith("| ")}
    assert "**" in row["olora"]                       # best mean
    assert "+" in row["inclora"].split("|")[2]        # within noise of the best (paired t, Holm)
    assert "**" not in row["seqlora"] and "+" not in row["seqlora"].split("|")[2]
    assert "reference: seqlora" in block and "F.Ra" in block


def test_compare_with_published(tree, tmp_path):
    baselines = published_numbers(tmp_path, "O-LoRA,1,Table 1,t5-large,O-LoRA,AA,1,75.0",
                                  "O-LoRA,1,Table 1 [SECONDARY: reprint],t5-large,O-LoRA,AA,avg_1_3,75.8",
                                  "O-LoRA,1,Table 1,llama-2-7b,O-LoRA,AA,1,99.0")
    text = table.compare_published(table.load_summaries(tree), "t5-large", fmt="csv",
                                   directory=baselines)
    rows = [l.split(",") for l in text.splitlines() if l.startswith("olora,")]
    by_order = {r[1]: r for r in rows}
    assert float(by_order["1"][3]) == 75.0 and float(by_order["1"][4]) == pytest.approx(71.1 - 75)
    assert by_order["avg_1_3"][-1] == "yes" and by_order["1"][-1] == "no"
    assert "99" not in text  # another backbone
    assert "differs from the published t5-large" in text


def test_table_out_writes_tables_and_plots(tmp_path, capsys):
    tree = tmp_path / "results"  # small: each run draws a heatmap
    for order in (1, 4):
        for method, AA in (("olora", 70.0), ("seqlora", 40.0)):
            write_summary(tree, method, order, 0, AA=AA + order)
    out = tmp_path / "out"
    assert main(["table", "--results", str(tree), "--out", str(out), "--reference", "olora",
                 "--compare-published"]) == 0
    for name in ("paper", "full", "compare"):
        for suffix in ("md", "tex", "csv"):
            assert (out / f"{name}.{suffix}").stat().st_size > 0
    assert any((out / "plots").rglob("*.png")) and any((out / "plots").rglob("*.pdf"))


def test_unknown_reference_is_refused(tree, capsys):
    assert main(["table", "--results", str(tree), "--reference", "nosuch"]) == 2
    assert "--reference nosuch" in capsys.readouterr().err


def test_table_entries_come_from_each_plugin_class_itself(monkeypatch):
    """Row order and published name are what the method's own class declares; a subclass under
    another name does not inherit them, and names no plugin declares follow the ranked ones."""
    from harness_methods import registry
    from harness_methods.olora import OLoRA

    class MyOLoRA(OLoRA):
        name = "myolora"

    real = registry.method_class
    monkeypatch.setattr(registry, "method_class",
                        lambda name: MyOLoRA if name == "myolora" else real(name))
    registry.table_entry.cache_clear()
    try:
        assert registry.table_entry("olora") == ((OLoRA.table_rank, "olora"), "O-LoRA")
        assert registry.table_entry("myolora")[1] == "myolora"
        names = ["zeta+sam", "myolora", "mtl", "seqft", "olora"]
        assert sorted(names, key=lambda n: registry.table_entry(n)[0]) == \
            ["seqft", "olora", "mtl", "myolora", "zeta+sam"]
    finally:
        registry.table_entry.cache_clear()


def test_the_tables_read_each_plugin_class_from_its_source_without_importing_torch(tree):
    """What the source states is what the class holds, for every built-in method; and a table
    is made without torch (a method's import brings it and peft: seconds)."""
    from harness_methods import registry

    for name, entry in registry.available().items():
        if entry.value.startswith("harness_methods."):
            own = vars(registry.method_class(name))
            assert registry._stated_in_source(name) == \
                {key: own[key] for key in registry.TABLE_KEYS if key in own}, name
    code = ("import sys; from harness.cli import main; "
            f"assert main(['table', '--results', {str(tree)!r}]) == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    made = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]


@pytest.mark.parametrize("body", [
    "table_rank = SeqLoRA.table_rank + 0.5",               # no literal
    "table_rank = 2.5\n    if True:\n        table_rank = 1.5",  # set again in a block
])
def test_a_rank_the_source_does_not_settle_is_read_from_the_class(body, tmp_path, monkeypatch):
    from harness_methods import registry

    (tmp_path / "unsettled.py").write_text(
        "from harness_methods.seqlora import SeqLoRA\n\n\n"
        f"class Unsettled(SeqLoRA):\n    {body}\n    paper_name = 'Unsettled'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "unsettled", raising=False)
    entry = EntryPoint("unsettled", "unsettled:Unsettled", registry.GROUP)
    monkeypatch.setattr(registry, "available", lambda: {"unsettled": entry})
    registry.table_entry.cache_clear()
    try:
        assert registry._stated_in_source("unsettled") is None
        assert registry.table_entry("unsettled") == ((1.5, "unsettled"), "Unsettled")
    finally:
        registry.table_entry.cache_clear()


@pytest.mark.parametrize("method", ["seqft", "seqlora", "inclora", "replay", "ewc", "lwf", "l2p",
                                    "lfpt5", "progprompt", "olora", "nlora", "pertask", "mtl",
                                    "inflora", "gainlora", "osft", "migu"])
def test_each_published_method_finds_its_numbers_under_its_paper_name(method):
    """The name a method's class gives its paper's rows is the one baselines/ records them under
    (GainLoRA's InfLoRA-based row, MIGU's row with full fine-tuning), on the papers' T5-large."""
    from harness_methods import registry

    published = table.load_published()
    paper_name = registry.table_entry(method)[1]
    assert ((published["method"] == paper_name) & (published["model"] == "t5-large")
            & (published["metric"] == "AA")).any(), paper_name


def test_compare_with_published_gives_kendalls_tau_of_the_ranking(tmp_path):
    """tau-b and its p-value as scipy computes them, over the methods that have a published
    number (a method with two published numbers counts once, at their mean)."""
    import scipy.stats

    root = tmp_path / "results"
    ours = {"seqlora": 30.0, "inclora": 20.0, "olora": 50.0, "nlora": 60.0, "replay": 10.0}
    for method, aa in ours.items():
        write_summary(root, method, 1, 0, AA=aa)
    write_summary(root, "pertask", 1, 0, AA=99.0)  # nothing published: not ranked
    published = {"SeqLoRA": [44.6], "IncLoRA": [66.0], "O-LoRA": [75.4, 75.0], "N-LoRA": [79.2],
                 "Replay": [55.2]}
    baselines = published_numbers(tmp_path, *(f"P,1,T,t5-large,{m},AA,1,{v}"
                                              for m, values in published.items() for v in values))
    text = table.compare_published(table.load_summaries(root), "t5-large", directory=baselines)
    line = next(l for l in text.splitlines() if l.startswith("order 1:"))
    x = [ours[m] for m in ("seqlora", "inclora", "olora", "nlora", "replay")]
    y = [44.6, 66.0, 75.2, 79.2, 55.2]
    tau, p = scipy.stats.kendalltau(x, y)
    assert f"Kendall's tau {tau:.2f} (p = {p:.3g}, 5 methods" in line
    assert tau == pytest.approx(0.6)  # 8 concordant, 2 discordant pairs of the 10
    assert "pertask" not in line


def test_a_number_published_under_another_label_sits_under_the_order_with_its_tasks(tree, tmp_path):
    """GainLoRA's "order 3" is the task list of our order 6."""
    baselines = published_numbers(tmp_path, "GainLoRA,2,Table 2,t5-large,O-LoRA,AA,3,61.5")
    text = table.compare_published(table.load_summaries(tree), "t5-large", fmt="csv",
                                   directory=baselines)
    by_order = {r.split(",")[1]: r.split(",") for r in text.splitlines() if r.startswith("olora,")}
    assert float(by_order["6"][3]) == 61.5 and by_order["3"][3] in ("", "nan")


def test_full_table_gives_mcnemar_per_item_and_the_detectable_difference(tmp_path):
    """One seed: no run-level test, but McNemar's from the stored predictions of the same items."""
    root = tmp_path / "results"
    right = {"olora": set(range(40)), "seqlora": set(range(30)) | {45, 46}}  # 10 vs 2 discordant
    for method, correct in right.items():
        write_summary(root, method, 1, 0, AA=len(correct) / 0.5)
        stage = root / "default" / method / "order1" / "seed0" / "stage_04-d"
        stage.mkdir()
        stage.joinpath("predictions.jsonl").write_text("".join(
            json.dumps({"task": "d", "index": i, "correct": i in correct}) + "\n" for i in range(50)))
    text = table.full_tables(table.load_summaries(root), fmt="github")
    row = next(l for l in text.splitlines() if l.startswith("| seqlora"))
    assert "0.0386 (2 / 10)" in row  # 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * 79 / 4096
    assert "with McNemar over the pooled test items" in text and "- with the paired t-test" in text


def test_parameter_metrics_sit_beside_the_published_ones_with_their_ratios(tmp_path):
    root = tmp_path / "results"
    ours = {"olora": {"ACR": 0.40, "AWOM": 2.0, "nuclear_norm": 4.0},
            "nlora": {"ACR": 0.10, "AWOM": 0.5, "nuclear_norm": 1.0}}
    for method, params in ours.items():
        write_summary(root, method, 1, 0, AA=50.0)
        path = root / "default" / method / "order1" / "seed0" / "summary.json"
        summary = json.loads(path.read_text())
        summary["parameter_metrics"] = params
        path.write_text(json.dumps(summary))
    baselines = published_numbers(tmp_path, "N-LoRA,1,Fig 1,t5-large,N-LoRA,collision_rate,avg_1_6,0.8",
                                  "N-LoRA,1,Fig 1,t5-large,O-LoRA,collision_rate,avg_1_6,46.6",
                                  "N-LoRA,1,Fig 3,t5-large,N-LoRA,nuclear_norm,avg_1_6,0.14",
                                  "N-LoRA,1,Fig 3,t5-large,O-LoRA,nuclear_norm,avg_1_6,6.80")
    text = table.compare_published(table.load_summaries(root), "t5-large", fmt="csv",
                                   directory=baselines)
    rows = {(r[0], r[1]): r for r in (l.split(",") for l in text.splitlines())
            if r[0] in ("collision_rate", "nuclear_norm")}
    assert float(rows["collision_rate", "N-LoRA"][2]) == pytest.approx(10.0)  # ACR in %
    assert float(rows["collision_rate", "O-LoRA"][4]) == pytest.approx(0.25)  # ours: 10 / 40
    assert float(rows["collision_rate", "O-LoRA"][5]) == pytest.approx(0.8 / 46.6, abs=0.005)
    assert float(rows["nuclear_norm", "O-LoRA"][2]) == 4.0
    assert ("orthogonality", "N-LoRA") not in rows  # nothing published: no row


def test_the_parameter_ratio_pairs_what_the_published_rows_name():
    """The pair in the parameter-metric comparison comes from the baseline data (the paper that
    publishes the metrics and the one baseline beside its own method), not from engine code."""
    published = table.load_published()
    pair = table.published_pair(published[published["model"] == "t5-large"])
    assert pair == ("N-LoRA", "O-LoRA")
    rows = published[published["metric"].isin(table.PUBLISHED_PARAMETERS)].copy()
    other_paper = rows.assign(paper="GORP")
    assert table.published_pair(pd.concat([rows, other_paper])) is None  # two papers: no pair
    third = rows[rows["method"] == "O-LoRA"].assign(method="InfLoRA")
    assert table.published_pair(pd.concat([rows, third])) is None  # two baselines: no single pair
