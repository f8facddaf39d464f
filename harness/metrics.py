"""Accuracy-matrix metrics, as pure functions of R.

`R` is a (T+1) x T array: row 0 is the untrained model, row i (1..T) the model after stage i,
column j task j of the sequence; NaN marks an entry that was not evaluated. A metric that needs a
missing entry is NaN; the others are still computed.
"""

from __future__ import annotations

import numpy as np


def _nan_if_empty(values: list[float]) -> float:
    return float(np.mean(values)) if values and not np.any(np.isnan(values)) else float("nan")


def average_accuracy(R: np.ndarray) -> float:
    """AA: mean over tasks of the accuracy after the last stage."""
    return _nan_if_empty(list(R[-1]))


def learning_accuracy(R: np.ndarray) -> float:
    """LA: mean of the diagonal R[j][j] (accuracy on each task just after learning it)."""
    T = R.shape[1]
    return _nan_if_empty([R[j + 1, j] for j in range(T)])


def backward_transfer(R: np.ndarray) -> float:
    """BWT (Lopez-Paz & Ranzato): mean over j<T of R[T][j] - R[j][j]; negative = forgetting."""
    T = R.shape[1]
    return _nan_if_empty([R[T, j] - R[j + 1, j] for j in range(T - 1)])


def forgetting(R: np.ndarray) -> float:
    """F.Ra: mean over j<T of (max over stages j..T-1 of R[k][j]) - R[T][j]; >= 0."""
    T = R.shape[1]
    return _nan_if_empty([np.max(R[j + 1:T, j]) - R[T, j] for j in range(T - 1)])


def forward_transfer(R: np.ndarray) -> float:
    """FWT (Lopez-Paz & Ranzato): mean over j>1 of R[j-1][j] - R[0][j] (needs unseen-task rows)."""
    T = R.shape[1]
    return _nan_if_empty([R[j, j] - R[0, j] for j in range(1, T)])


def summarize(R: np.ndarray) -> dict[str, float]:
    """All metrics; those that need one row per task (LA, BWT, FWT, forgetting) are NaN when R has
    fewer rows, as for a method trained once on the whole sequence."""
    out = {"AA": average_accuracy(R)}
    per_stage = R.shape[0] == R.shape[1] + 1
    nan = float("nan")
    out["LA"] = learning_accuracy(R) if per_stage else nan
    if R.shape[1] > 1:
        out.update(BWT=backward_transfer(R) if per_stage else nan,
                   FWT=forward_transfer(R) if per_stage else nan,
                   forgetting=forgetting(R) if per_stage else nan)
    return out
