"""Significance across seeds and orders (scipy.stats).

Runs of two methods on the same (sequence, seed) are paired samples. For each method against the
best method of a group (and against a chosen reference) this gives the mean difference, the paired
t-test and the Wilcoxon signed-rank test, with Holm's correction across the comparisons of a table.
A test that has too few pairs is not run; its row says why and how many pairs it needs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
MIN_PAIRS_T = 2
# The exact two-sided Wilcoxon p-value is at least 2 / 2^n: below 6 pairs it can never reach 0.05.
MIN_PAIRS_WILCOXON = 6


def describe(values: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Mean, sample std and a 95% bootstrap (BCa) confidence interval of the mean."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    n = len(values)
    out = {"n": n, "mean": float(values.mean()) if n else math.nan,
           "std": float(values.std(ddof=1)) if n > 1 else math.nan,
           "ci_low": math.nan, "ci_high": math.nan}
    if n > 1 and np.ptp(values) == 0:  # no spread: the interval is the point
        out["ci_low"] = out["ci_high"] = out["mean"]
    elif n > 1:
        with warnings.catch_warnings():  # BCa warns on tiny samples; the interval is still given
            warnings.simplefilter("ignore")
            ci = stats.bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=2000,
                                 rng=np.random.default_rng(seed)).confidence_interval
        out["ci_low"], out["ci_high"] = float(ci.low), float(ci.high)
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment (NaN entries are skipped). Written out because scipy has only
    the Benjamini-Hochberg procedure; it is four lines."""
    valid = [(p, i) for i, p in enumerate(pvalues) if not math.isnan(p)]
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(valid)):
        running = max(running, min(1.0, (len(valid) - rank) * p))
        adjusted[i] = running
    return adjusted


@dataclass
class PairedTest:
    n: int
    mean_diff: float
    t_p: float
    wilcoxon_p: float
    note: str = ""
    sd_diff: float = math.nan  # the spread of the paired differences (for the power note)


def paired_test(a: np.ndarray, b: np.ndarray) -> PairedTest:
    """Two-sided tests of a - b over paired samples; NaN p-values with a note when too few."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = ~(np.isnan(a) | np.isnan(b))
    diff = a[keep] - b[keep]
    n = len(diff)
    notes, t_p, w_p = [], math.nan, math.nan
    if n < MIN_PAIRS_T:
        notes.append(f"t-test needs >= {MIN_PAIRS_T} pairs (have {n})")
    elif np.all(diff == 0):
        t_p = w_p = 1.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant differences give a warning and p = 0 or nan
            t_p = float(stats.ttest_rel(a[keep], b[keep]).pvalue)
        if math.isnan(t_p):  # all differences equal and non-zero: as significant as it gets
            t_p = 0.0
    if n < MIN_PAIRS_WILCOXON:
        notes.append(f"Wilcoxon needs >= {MIN_PAIRS_WILCOXON} pairs to reach p < {ALPHA} "
                     f"(have {n})")
        w_p = math.nan
    elif not np.all(diff == 0):
        w_p = float(stats.wilcoxon(a[keep], b[keep]).pvalue)
    return PairedTest(n, float(diff.mean()) if n else math.nan, t_p, w_p, "; ".join(notes),
                      float(diff.std(ddof=1)) if n > 1 else math.nan)


def compare(runs: pd.DataFrame, metric: str = "AA", reference: str | None = None) -> pd.DataFrame:
    """One row per method of a group: mean, std, CI, and paired tests against the best method
    (highest mean) and, if given, against `reference`, Holm-adjusted within each family.

    `runs` has one row per run with columns method, sequence, seed and `metric`. Column `tied` is
    True for the best method and for every method whose Holm-adjusted paired t-test against it is
    not significant at ALPHA; a method whose test could not be run is not marked (its note says
    why)."""
    wide = runs.pivot_table(index=["sequence", "seed"], columns="method", values=metric,
                            aggfunc="mean")
    rows = {m: describe(wide[m].to_numpy()) for m in wide.columns}
    table = pd.DataFrame(rows).T
    table.index.name = "method"
    best = table["mean"].astype(float).idxmax()
    targets = [("best", best)] + ([("ref", reference)] if reference else [])
    for label, target in targets:
        if target not in wide.columns:
            table[f"{label}_note"] = f"no runs of {target!r} in this group"
            continue
        tests = {m: paired_test(wide[m].to_numpy(), wide[target].to_numpy())
                 for m in wide.columns if m != target}
        table[f"vs_{label}_diff"] = pd.Series({m: t.mean_diff for m, t in tests.items()})
        table[f"vs_{label}_sd"] = pd.Series({m: t.sd_diff for m, t in tests.items()})
        table[f"vs_{label}_pairs"] = pd.Series({m: t.n for m, t in tests.items()})
        for test, key in (("t_p", "t"), ("wilcoxon_p", "w")):
            raw = {m: getattr(t, test) for m, t in tests.items()}
            adjusted = dict(zip(raw, holm(list(raw.values()))))
            table[f"vs_{label}_{key}_p"] = pd.Series(raw)
            table[f"vs_{label}_{key}_p_holm"] = pd.Series(adjusted)
        table[f"vs_{label}_note"] = pd.Series({m: t.note for m, t in tests.items()})
    adjusted_t = table.get("vs_best_t_p_holm")
    table["best"] = table.index == best
    table["tied"] = table["best"] | ((adjusted_t >= ALPHA) if adjusted_t is not None else False)
    return table.sort_values("mean", ascending=False)


# -- per-example tests and power ---------------------------------------------------------------
@dataclass
class McNemar:
    a_only: int   # items method a got right and method b wrong
    b_only: int   # the reverse
    items: int    # paired items
    p: float      # two-sided exact p-value

    @property
    def discordant_rate(self) -> float:
        return (self.a_only + self.b_only) / self.items if self.items else math.nan


def mcnemar_exact(a: dict, b: dict) -> McNemar:
    """McNemar's exact test on the items both runs scored (`item -> correct`): under the null
    each discordant item is a fair coin, so the p-value is the two-sided binomial test of the
    a-only count among the discordant ones (scipy.stats.binomtest)."""
    shared = a.keys() & b.keys()
    a_only = sum(1 for k in shared if a[k] and not b[k])
    b_only = sum(1 for k in shared if b[k] and not a[k])
    p = 1.0 if a_only + b_only == 0 else float(stats.binomtest(a_only, a_only + b_only).pvalue)
    return McNemar(a_only, b_only, len(shared), p)


def detectable_difference(sd_diff: float, n: int, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired t-test over n pairs detects at ALPHA
    with `power`, given the standard deviation of the paired differences (normal approximation
    with t quantiles)."""
    if n < MIN_PAIRS_T or not math.isfinite(sd_diff):
        return math.nan
    return float((stats.t.ppf(1 - ALPHA / 2, n - 1) + stats.t.ppf(power, n - 1))
                 * sd_diff / math.sqrt(n))


def detectable_difference_items(discordant_rate: float, items: int, power: float = 0.8) -> float:
    """The same for McNemar's test over `items` paired items, in accuracy points: a difference
    delta in accuracy is detected when items * delta^2 / rate reaches (z_{1-ALPHA/2} + z_power)^2
    (Connor's approximation, its delta^2 term dropped)."""
    if not items or not math.isfinite(discordant_rate):
        return math.nan
    z = stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(power)
    return float(100 * z * math.sqrt(discordant_rate / items))
