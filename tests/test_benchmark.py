from harness.benchmark import load_benchmark
from harness.cli import main


def test_fifteen_tasks_with_categories_and_labels():
    bench = load_benchmark()
    assert len(bench.tasks) == 15
    assert {t.category for t in bench.tasks.values()} == {
        "TC", "SC", "NLI", "QQP", "BoolQA", "MultiRC", "WiC", "COPA"}
    assert bench.task("MultiRC").labels == ("False", "True")  # order = the prompt's option order
    assert bench.task("yahoo").folder == "TC/yahoo"


def test_six_orders_exact():
    orders = load_benchmark().orders
    assert orders[1] == ("dbpedia", "amazon", "yahoo", "agnews")
    assert orders[3] == ("yahoo", "amazon", "agnews", "dbpedia")
    assert orders[6][:3] == ("yelp", "amazon", "MNLI") and orders[6][-1] == "WiC"
    assert all(len(orders[k]) == 15 and len(set(orders[k])) == 15 for k in (4, 5, 6))


def test_list_commands_print(capsys):
    for what in ("tasks", "orders", "methods", "profiles"):
        assert main(["list", what]) == 0
    out = capsys.readouterr().out
    assert "dbpedia" in out and "inclora" in out and "t5-large" in out


def test_a_sequence_is_its_tasks_whatever_a_source_calls_it():
    bench = load_benchmark()
    assert bench.order_of(bench.orders[6]) == 6 and bench.order_of(bench.orders[6][::-1]) is None
    assert {"SAPT order 4", "GainLoRA order 3"} <= set(bench.also_called(6))
    assert {"SAPT order 5", "GainLoRA order 4"} <= set(bench.also_called(4))
    assert bench.our_label("GainLoRA", "3") == "6" and bench.our_label("SAPT", "5") == "4"
    assert bench.our_label("O-LoRA", "3") == "3"  # no aliases: our numbering is O-LoRA's


def test_an_alias_naming_an_unknown_task_is_refused(tmp_path):
    import pytest

    from harness.errors import HarnessError

    definition = tmp_path / "benchmark.toml"
    definition.write_text('[tasks.a]\ncategory = "TC"\nlabels = ["x"]\n[orders]\n1 = ["a"]\n'
                          '[aliases.Paper]\n"2" = ["a", "b"]\n')
    with pytest.raises(HarnessError, match="alias Paper order 2 names unknown tasks"):
        load_benchmark(definition)


def test_a_task_list_that_is_an_order_runs_as_that_order():
    from harness.cli import build_parser
    from harness.cli.run import _sweep_contents

    bench = load_benchmark()
    args = build_parser().parse_args(["run", "--method", "seqlora", "--tasks", ",".join(bench.orders[3])])
    assert _sweep_contents(args, bench)[1] == [(3, bench.orders[3])]
