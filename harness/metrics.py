"""Accuracy-matrix metrics, as pure functions of R, and the answer normalisation that decides
which predictions are correct.

`R` is a (T+1) x T array: row 0 is the untrained model, row i (1..T) the model after stage i,
column j task j of the sequence; NaN marks an entry that was not evaluated. A metric that needs a
missing entry is NaN; the others are still computed.
"""

from __future__ import annotations

import string

import numpy as np

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """The reference normalisation: lower-case, drop ASCII punctuation, collapse whitespace.

    Articles are kept (the reference says so explicitly).
    """
    return " ".join(text.lower().translate(_PUNCT).split())


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


def forgetting_by_kind(R: np.ndarray, O: np.ndarray) -> dict[str, float]:
    """BWT and F.Ra split by what the lost answers became. With O the share (%) of answers outside
    the task's label set and W = 100 - R - O the share of wrong labels, R[T][j] - R[j][j] =
    -(O[T][j] - O[j][j]) - (W[T][j] - W[j][j]): the `_format` part counts answers that left the
    label set, the `_label` part answers that stayed in it but changed to a wrong label; the parts
    add up to BWT and forgetting exactly. F.Ra's split is taken at the stage k < T where task j
    was best."""
    T = R.shape[1]
    if R.shape[0] != T + 1 or T < 2:
        return {k: float("nan") for k in ("BWT_format", "BWT_label", "forgetting_format",
                                           "forgetting_label")}
    W = 100.0 - R - O
    best = [j + 1 + int(np.argmax(R[j + 1:T, j])) if not np.isnan(R[j + 1:T, j]).any() else j + 1
            for j in range(T - 1)]
    return {
        "BWT_format": _nan_if_empty([O[j + 1, j] - O[T, j] for j in range(T - 1)]),
        "BWT_label": _nan_if_empty([W[j + 1, j] - W[T, j] for j in range(T - 1)]),
        "forgetting_format": _nan_if_empty([O[T, j] - O[best[j], j] for j in range(T - 1)]),
        "forgetting_label": _nan_if_empty([W[T, j] - W[best[j], j] for j in range(T - 1)]),
    }
