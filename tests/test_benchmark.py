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
