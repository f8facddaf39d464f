import json
import logging

import pytest
import torch

from harness.benchmark import Task, load_benchmark
from harness.data import build_source, load_instructions, load_task, stratified_sample
from harness.errors import HarnessError
from harness.metrics import normalize
from tests.conftest import SHARED_DATA, write_task

SC = Task("amazon", "SC", ("very negative", "negative", "neutral", "positive", "very positive"))
COPA = Task("COPA", "COPA", ("A", "B"))


def test_prompt_is_byte_exact():
    got = build_source(SC, "Title: t\nText: x", "What is it?\n")
    assert got == ("Task:SC\nDataset:amazon\nWhat is it?\nOption: very negative, negative, neutral, "
                   "positive, very positive \nTitle: t\nText: x\nAnswer:")


def test_copa_has_no_instruction_and_no_options():
    got = build_source(COPA, "Which? A or B.\nA: a\nB: b", None)
    assert got == "Task:COPA\nDataset:COPA\nWhich? A or B.\nA: a\nB: b\nAnswer:"


def test_normaliser_keeps_articles():
    assert normalize("The Sports.") == "the sports"
    assert normalize("Society & Culture") == "society culture"
    assert normalize("  very \n positive ") == "very positive"


def _instr(root):
    (root / "instruction_config.json").write_text(json.dumps(
        {"SC": [{"instruction_type": "zero-shot", "instruction": "Feel?\n"}]}))


def _records(labels, n):
    return [{"sentence": f"s{i}", "label": labels[i % len(labels)]} for i in range(n)]


def test_missing_file_is_named(tmp_path):
    _instr(tmp_path)
    with pytest.raises(HarnessError, match=r"SC/amazon/labels.json: file not found"):
        load_task(tmp_path, SC, load_instructions(tmp_path))


def test_malformed_json_reports_file_and_position(tmp_path):
    _instr(tmp_path)
    folder = write_task(tmp_path, "SC", "amazon", list(SC.labels), _records(SC.labels, 5),
                        _records(SC.labels, 5))
    (folder / "train.json").write_text('[{"sentence": "a", "label": "neutral"},\n {"sentence": }]')
    with pytest.raises(HarnessError, match=r"train.json: malformed JSON at line 2, column"):
        load_task(tmp_path, SC, load_instructions(tmp_path))


@pytest.mark.parametrize("records, message", [
    ([{"sentence": "a"}], "record 0 lacks a 'sentence' or 'label'"),
    ([], "the train split is empty"),
    ([{"sentence": "a", "label": 3}], "non-string"),
])
def test_bad_records(tmp_path, records, message):
    _instr(tmp_path)
    write_task(tmp_path, "SC", "amazon", list(SC.labels), records, _records(SC.labels, 5))
    with pytest.raises(HarnessError, match=message):
        load_task(tmp_path, SC, load_instructions(tmp_path))


def test_labels_outside_the_set(tmp_path, caplog):
    _instr(tmp_path)
    test = _records(SC.labels, 10) + [{"sentence": "x", "label": "-"}] * 3
    write_task(tmp_path, "SC", "amazon", list(SC.labels), _records(SC.labels, 10), test)
    with caplog.at_level(logging.WARNING):
        kept = load_task(tmp_path, SC, load_instructions(tmp_path))
    assert kept.unlabelled_in_test == 3 and len(kept.test) == 13
    assert sum("3 records with labels outside" in r.message for r in caplog.records) == 1
    dropped = load_task(tmp_path, SC, load_instructions(tmp_path), drop_unlabelled=True)
    assert len(dropped.test) == 10
    # In training data an unknown label is an error unless dropped.
    write_task(tmp_path, "SC", "amazon", list(SC.labels), _records(SC.labels, 5) +
               [{"sentence": "x", "label": "positve"}], test)
    with pytest.raises(HarnessError, match=r"train.json: 1 records have labels outside"):
        load_task(tmp_path, SC, load_instructions(tmp_path))


def test_label_file_must_match_definition(tmp_path):
    _instr(tmp_path)
    write_task(tmp_path, "SC", "amazon", ["positive", "negative"], _records(SC.labels, 5),
               _records(SC.labels, 5))
    with pytest.raises(HarnessError, match="differs from the benchmark definition"):
        load_task(tmp_path, SC, load_instructions(tmp_path))


def test_stratified_sample_keeps_proportions_and_is_seeded():
    records = [{"label": "a"}] * 60 + [{"label": "b"}] * 30 + [{"label": "c"}] * 10
    records = [dict(r, i=i) for i, r in enumerate(records)]
    sample = stratified_sample(records, 20, seed=1)
    counts = {lab: sum(r["label"] == lab for r in sample) for lab in "abc"}
    assert counts == {"a": 12, "b": 6, "c": 2}
    assert sample == stratified_sample(records, 20, seed=1)
    assert sample != stratified_sample(records, 20, seed=2)
    assert [r["i"] for r in sample] == sorted(r["i"] for r in sample)


@pytest.mark.skipif(not (SHARED_DATA / "NLI" / "MNLI" / "test.json").exists(), reason="no real data")
def test_real_mnli_unlabelled_records_are_counted():
    bench = load_benchmark()
    data = load_task(SHARED_DATA, bench.task("MNLI"), load_instructions(SHARED_DATA),
                     train_per_task=10)
    assert data.unlabelled_in_test == 131
    assert data.test[0]["source"].startswith("Task:NLI\nDataset:MNLI\nWhat is the logical")


@pytest.mark.parametrize("config, message", [
    ({"SC": "Feel?"}, "no instruction entry"),
    ({"SC": [{"instruction": None}]}, "no instruction entry"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_instruction_config(tmp_path, config, message):
    (tmp_path / "instruction_config.json").write_text(json.dumps(config))
    with pytest.raises(HarnessError, match=message):
        load_instructions(tmp_path)


def test_labels_file_must_be_a_list_of_strings(tmp_path):
    _instr(tmp_path)
    write_task(tmp_path, "SC", "amazon", {"a": 1}, _records(SC.labels, 5), _records(SC.labels, 5))
    with pytest.raises(HarnessError, match="array of label strings"):
        load_task(tmp_path, SC, load_instructions(tmp_path))


def test_indices_point_into_the_file_after_dropping(tmp_path):
    _instr(tmp_path)
    test = [{"sentence": "x", "label": "-"}] + _records(SC.labels, 4)
    write_task(tmp_path, "SC", "amazon", list(SC.labels), _records(SC.labels, 5), test)
    data = load_task(tmp_path, SC, load_instructions(tmp_path), drop_unlabelled=True)
    assert list(data.test["index"]) == [1, 2, 3, 4]


def test_heldout_split_is_carved_from_train_outside_the_training_sample(synthetic_dir):
    """--eval-split heldout: records of train.json the training sub-sample left out, stratified;
    the training sub-sample is the very one a test-split run trains on."""
    bench = load_benchmark()
    task = bench.task("agnews")
    instructions = load_instructions(synthetic_dir)
    on_test = load_task(synthetic_dir, task, instructions, train_per_task=40, test_per_task=20)
    held = load_task(synthetic_dir, task, instructions, train_per_task=40, test_per_task=20,
                     eval_split="heldout")
    assert held.train["index"] == on_test.train["index"]
    assert len(held.test) == 20 and not set(held.test["index"]) & set(held.train["index"])
    train_records = json.loads((synthetic_dir / task.folder / "train.json").read_text())
    assert [train_records[i]["label"] for i in held.test["index"]] == held.test["target"]
    assert sorted(set(held.test["target"])) == sorted(task.labels)  # every label, stratified
    with pytest.raises(HarnessError, match="no records left for a held-out split"):
        load_task(synthetic_dir, task, instructions, eval_split="heldout")  # all of train trains


def test_a_dev_split_that_copies_test_is_detected_and_reported_once(tmp_path, synthetic_dir, caplog):
    """Upstream dev.json is a byte copy of test.json; the synthetic generator draws its own."""
    from harness import data

    bench = load_benchmark()
    assert data.dev_copies_test(synthetic_dir, bench.tasks.values()) == []
    sst2 = bench.tasks["SST-2"]
    write_task(tmp_path, sst2.category, sst2.name, list(sst2.labels),
               [{"sentence": "a", "label": "Good"}], [{"sentence": "b", "label": "Bad"}])
    assert data.dev_copies_test(tmp_path, bench.tasks.values()) == ["SST-2"]
    with caplog.at_level(logging.WARNING, logger="harness.data"):
        data.note_dev_copies(tmp_path, bench.tasks.values())
        data.note_dev_copies(tmp_path, bench.tasks.values())
    notes = [r.getMessage() for r in caplog.records if "copy of test.json" in r.getMessage()]
    assert len(notes) == 1 and "1 of 15 tasks (SST-2)" in notes[0] and "--eval-split heldout" in notes[0]
    if SHARED_DATA.is_dir():  # the real benchmark: every task's dev is its test
        assert len(data.dev_copies_test(SHARED_DATA, bench.tasks.values())) == 15


def test_a_text_is_tokenised_once_per_process_for_a_tokenizer_and_bounds(synthetic_dir, monkeypatch):
    # A sweep's job process runs many runs on the same tasks: a later run's batcher reuses the ids
    # (the same batches), and one with other bounds tokenises afresh (truncation differs).
    from harness import textio
    from harness.testing.kit import make_context

    monkeypatch.setattr(textio, "_token_ids", {})
    ctx, _, _ = make_context(synthetic_dir, "seqlora", tasks=("agnews",), n_train=8)
    calls = []
    tok = ctx.backbone.tokenizer
    original = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    sources, targets = ["one two three four", "five six"], ["x", "y z"]
    first = textio.Batcher(ctx.backbone, 512, 50).train_batch(sources, targets)
    assert len(calls) == 2  # sources, then targets
    again = textio.Batcher(ctx.backbone, 512, 50).train_batch(sources, targets)
    assert len(calls) == 2 and all(torch.equal(first[k], again[k]) for k in ("input_ids", "labels"))
    short = textio.Batcher(ctx.backbone, 3, 50).train_batch(sources, targets)
    assert len(calls) == 4 and short["input_ids"].shape[1] == 3
