"""summary.json through its schema (harness.summary): what a run writes reads back equal, keys in
the documented order; a file that is not a summary is refused with its path; newer fields are
ignored."""

import json

import pytest

from harness.errors import HarnessError
from harness.summary import Summary, read_summaries, read_summary

DOCUMENTED = ["method", "sequence", "order", "tasks", "seed", "profile", "benchmark", "model",
              "tuned", "metrics", "stage_average_accuracy", "accuracy_matrix", "format_matrix", "row_labels",
              "missing_stages", "parameter_metrics", "train_seconds", "eval_seconds",
              "train_eval_seconds", "fingerprint", "threads", "efficiency", "warnings"]


def minimal(**extra):
    return {"method": "olora", "sequence": "order1", "tasks": ["a", "b"], "seed": 0,
            "profile": "default", "benchmark": {"kind": "real", "data_dir": "/d"},
            "metrics": {"AA": 50.0}, "accuracy_matrix": [[0.0, 0.0], [90.0, 0.0], [80.0, 20.0]],
            **extra}


def test_a_written_summary_reads_back_equal_in_the_documented_order(tmp_path):
    summary = Summary.from_json(minimal(order=1, fingerprint="0123"), "test")
    assert list(summary.to_json()) == DOCUMENTED
    assert summary.row_labels == ["base", "a", "b"] and not summary.joint
    path = tmp_path / "default" / "olora" / "order1" / "seed0" / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(summary.to_json()))
    again = read_summary(path)
    assert again == summary and again.folder == path.parent
    assert read_summaries(tmp_path) == [summary] and read_summaries(tmp_path, "t5-large") == []


def test_fields_a_later_version_adds_are_ignored():
    assert Summary.from_json(minimal(new_field=[1, 2]), "test").method == "olora"


@pytest.mark.parametrize("text, problem", [
    ('{"method": "olora", ', "JSONDecodeError"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({k: v for k, v in minimal().items() if k != "metrics"}), "no metrics"),
    (json.dumps(minimal(accuracy_matrix=[[0.0], [1.0]])), "do not fit together"),
])
def test_a_file_that_is_not_a_summary_is_refused_with_its_path(tmp_path, text, problem):
    path = tmp_path / "summary.json"
    path.write_text(text)
    with pytest.raises(HarnessError, match=problem) as caught:
        read_summary(path)
    assert str(caught.value).startswith(f"{path}: corrupt summary")


def test_a_summary_written_before_the_rename_keeps_its_timing(tmp_path):
    """`wall_seconds` (its earlier name) is read as `train_eval_seconds`."""
    summary = Summary.from_json(minimal(wall_seconds=12.5), tmp_path / "summary.json")
    assert summary.train_eval_seconds == 12.5
