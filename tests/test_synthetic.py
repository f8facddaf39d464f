import json

from harness.benchmark import load_benchmark
from harness.data import load_instructions, load_task
from harness.synthetic import generate_task, is_synthetic


def test_every_task_written_with_its_label_set(synthetic_dir):
    bench = load_benchmark()
    instructions = load_instructions(synthetic_dir)
    for task in bench.tasks.values():
        data = load_task(synthetic_dir, task, instructions)
        assert set(data.train["target"]) == set(task.labels)
        assert data.unlabelled_in_test == 0
    assert is_synthetic(synthetic_dir)


def test_generation_is_deterministic_and_seed_dependent():
    task = load_benchmark().task("yelp")
    assert generate_task(task, 20, 5, seed=3) == generate_task(task, 20, 5, seed=3)
    assert generate_task(task, 20, 5, seed=3) != generate_task(task, 20, 5, seed=4)


def test_tasks_share_vocabulary_and_label_words(synthetic_dir):
    bench = load_benchmark()

    def vocab(name):
        records = json.loads((synthetic_dir / bench.task(name).folder / "train.json").read_text())
        return {w for r in records for w in r["sentence"].split()}

    # Topic cue words cross tasks: sports words appear in agnews and yahoo.
    assert {"league", "coach"} <= vocab("agnews") & vocab("yahoo")
    # A cue word that means True in one task means False in another (interference).
    assert "yes" in vocab("BoolQA") and "yes" in vocab("MultiRC")  # True in one, False in the other
    assert bench.task("QQP").labels and set(bench.task("QQP").labels) == set(bench.task("WiC").labels)
