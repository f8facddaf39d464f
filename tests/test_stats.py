"""Significance helpers against values computed by hand."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from harness.stats import compare, describe, holm, paired_test


def test_holm_step_down():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, max(0.03, 2*0.03), max(0.06, 1*0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, math.nan, 0.6]) == pytest.approx([1.0, math.nan, 1.0], nan_ok=True)


def test_paired_t_test_by_hand():
    a, b = np.array([1.0, 2, 3, 4]), np.array([0.0, 0, 1, 1])
    # differences 1, 2, 2, 3: mean 2, sd sqrt(2/3), t = 2 / (sd / 2)
    t = 2 / (math.sqrt(2 / 3) / 2)
    result = paired_test(a, b)
    assert result.n == 4 and result.mean_diff == 2.0
    assert result.t_p == pytest.approx(2 * sps.t.sf(t, df=3))
    assert math.isnan(result.wilcoxon_p) and "Wilcoxon needs >= 6 pairs" in result.note


def test_wilcoxon_exact_by_hand():
    a = np.arange(1.0, 7.0) + 10
    b = np.full(6, 10.0)
    # all six differences positive: W- = 0, the most extreme of 2^6 sign patterns, two-sided
    assert paired_test(a, b).wilcoxon_p == pytest.approx(2 / 64)


def test_too_few_pairs_is_refused_with_the_number_needed():
    result = paired_test(np.array([1.0]), np.array([0.0]))
    assert math.isnan(result.t_p) and "t-test needs >= 2 pairs (have 1)" in result.note
    assert paired_test(np.array([1.0, np.nan]), np.array([0.0, 1.0])).n == 1


def test_describe_mean_std_and_interval():
    d = describe(np.array([1.0, 2.0, 3.0, 4.0, 10.0]))
    assert d["mean"] == 4.0 and d["std"] == pytest.approx(math.sqrt(50 / 4))
    assert d["ci_low"] < 4.0 < d["ci_high"]
    assert describe(np.array([5.0, 5.0]))["ci_low"] == 5.0
    assert math.isnan(describe(np.array([5.0]))["ci_low"])


def test_compare_marks_best_and_ties():
    rng = np.random.default_rng(0)
    rows = []
    for seq in ("order1", "order2", "order3"):
        for seed in range(3):
            base = rng.normal(50, 1)
            for method, shift in (("good", 10.0), ("close", 9.9), ("bad", -20.0)):
                rows.append({"method": method, "sequence": seq, "seed": seed,
                             "AA": base + shift + rng.normal(0, 0.5)})
    table = compare(pd.DataFrame(rows), reference="bad")
    assert table.index[0] == "good" and table.loc["good", "best"]
    assert table.loc["close", "tied"] and not table.loc["bad", "tied"]
    assert table.loc["bad", "vs_best_t_p_holm"] < 0.05
    assert table.loc["good", "vs_ref_diff"] == pytest.approx(
        np.mean([r["AA"] for r in rows if r["method"] == "good"])
        - np.mean([r["AA"] for r in rows if r["method"] == "bad"]))


def test_mcnemar_exact_is_the_binomial_tail_of_the_discordant_items():
    from harness.stats import mcnemar_exact

    # 20 items: 9 only a got right, 2 only b, 5 both, 4 neither.
    outcomes = ["ab"] * 5 + ["a"] * 9 + ["b"] * 2 + [""] * 4
    a = {i: "a" in o for i, o in enumerate(outcomes)}
    b = {i: "b" in o for i, o in enumerate(outcomes)}
    b[99] = True  # an item only one run scored is not paired
    test = mcnemar_exact(a, b)
    assert (test.a_only, test.b_only, test.items) == (9, 2, 20)
    # two-sided: 2 * P(X >= 9), X ~ Binomial(11, 1/2) = 2 * (55 + 11 + 1) / 2^11
    assert test.p == pytest.approx(2 * (55 + 11 + 1) / 2 ** 11)
    assert mcnemar_exact(a, a).p == 1.0 and test.discordant_rate == pytest.approx(11 / 20)


def test_the_detectable_differences_have_the_stated_power():
    """At the stated difference the tests reach power 0.8: the paired t-test by its noncentral t
    distribution, McNemar's exact test by summing binomial probabilities."""
    from harness.stats import detectable_difference, detectable_difference_items

    sd, n = 3.0, 12
    delta = detectable_difference(sd, n)
    critical = sps.t.ppf(0.975, n - 1)
    power = sps.nct.sf(critical, n - 1, delta * math.sqrt(n) / sd) + \
        sps.nct.cdf(-critical, n - 1, delta * math.sqrt(n) / sd)
    assert power == pytest.approx(0.8, abs=0.02)
    assert math.isnan(detectable_difference(sd, 1))

    rate, items = 0.2, 2000
    delta = detectable_difference_items(rate, items) / 100
    discordant = round(rate * items)
    p_a = 0.5 + delta / (2 * rate)  # a discordant item favours a with this probability
    significant = [k for k in range(discordant + 1)
                   if sps.binomtest(k, discordant).pvalue < 0.05]
    power = sum(sps.binom.pmf(k, discordant, p_a) for k in significant)
    assert power == pytest.approx(0.8, abs=0.05)
