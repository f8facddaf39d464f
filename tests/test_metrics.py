import numpy as np
import pytest

from harness import metrics

# Rows: base, after stage 1..3; columns: tasks 1..3 (hand-made).
R = np.array([
    [10.0, 20.0, 30.0],
    [80.0, 25.0, 35.0],
    [60.0, 90.0, 40.0],
    [50.0, 70.0, 95.0],
])


def test_hand_computed_values():
    assert metrics.average_accuracy(R) == pytest.approx((50 + 70 + 95) / 3)
    assert metrics.learning_accuracy(R) == pytest.approx((80 + 90 + 95) / 3)
    assert metrics.backward_transfer(R) == pytest.approx(((50 - 80) + (70 - 90)) / 2)
    assert metrics.forgetting(R) == pytest.approx(((80 - 50) + (90 - 70)) / 2)
    assert metrics.forward_transfer(R) == pytest.approx(((25 - 20) + (40 - 30)) / 2)


def test_missing_entries_only_affect_metrics_that_need_them():
    partial = R.copy()
    partial[0, 1] = np.nan  # no base evaluation of task 2
    out = metrics.summarize(partial)
    assert np.isnan(out["FWT"])
    assert out["AA"] == pytest.approx(metrics.average_accuracy(R))
    assert out["BWT"] == pytest.approx(metrics.backward_transfer(R))


def test_forgetting_splits_exactly_into_format_and_label_parts():
    """R = 100 - O - W: task 0 loses 40 points after its stage, 30 of them to answers outside the
    label set (O 10 -> 40) and 10 to wrong labels (W 20 -> 30); its best row is stage 1."""
    from harness.metrics import backward_transfer, forgetting, forgetting_by_kind

    R = np.array([[0.0, 0.0], [70.0, 5.0], [30.0, 80.0]])
    O = np.array([[100.0, 100.0], [10.0, 50.0], [40.0, 5.0]])
    split = forgetting_by_kind(R, O)
    assert split["BWT_format"] == pytest.approx(-30) and split["BWT_label"] == pytest.approx(-10)
    assert split["BWT_format"] + split["BWT_label"] == pytest.approx(backward_transfer(R))
    assert split["forgetting_format"] == pytest.approx(30) and split["forgetting_label"] == pytest.approx(10)
    assert split["forgetting_format"] + split["forgetting_label"] == pytest.approx(forgetting(R))
    assert np.isnan(forgetting_by_kind(R, np.full_like(O, np.nan))["BWT_format"])
