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
