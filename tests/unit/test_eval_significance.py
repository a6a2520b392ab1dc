"""Paired significance tests (eval.significance, PAPER.md §5) against direct scipy calls and
hand-worked binomial / chi-square values on constructed data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from eval.significance import format_p, mcnemar, paired_bootstrap, paired_ttest


def test_paired_ttest_matches_scipy():
    a = [94.1, 93.8, 94.5]
    b = [90.2, 91.0, 89.9]
    res = paired_ttest(a, b)
    ref = stats.ttest_rel(a, b)
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    # differences 3.9, 2.8, 4.6 -> mean 3.7666667
    assert res.effect == pytest.approx(3.7666667, abs=1e-6)
    assert res.n == 3 and res.test == "paired_t"


def test_paired_ttest_hand_worked():
    # differences 25, 20, 30: mean 25, sample sd 5, t = 25 / (5 / sqrt 3) = 8.6602540 with 2 df.
    res = paired_ttest([75.0, 80.0, 85.0], [50.0, 60.0, 55.0])
    assert res.statistic == pytest.approx(25 / (5 / math.sqrt(3)), rel=1e-12)
    assert res.p_value == pytest.approx(2 * stats.t.sf(25 / (5 / math.sqrt(3)), df=2), rel=1e-12)


def test_paired_ttest_edge_cases():
    with pytest.raises(ValueError, match="at least 2"):
        paired_ttest([1.0], [2.0])
    with pytest.raises(ValueError, match="equal length"):
        paired_ttest([1.0, 2.0], [2.0])
    # constant difference 1 (scipy: t = inf, p = 0) or 0 (scipy: NaN): undefined, NaN for both
    for b in ([0.0, 1.0, 2.0], [1.0, 2.0, 3.0]):
        res = paired_ttest([1.0, 2.0, 3.0], b)
        assert math.isnan(res.p_value) and math.isnan(res.statistic)


def test_mcnemar_exact_hand_worked():
    # 8 samples only a hits, 2 only b hits, the rest concordant.
    # Two-sided exact binomial: 2 * P(X >= 8 | n=10, 1/2) = 2 * (45 + 10 + 1) / 1024 = 0.109375.
    a = np.array([1] * 8 + [0] * 2 + [1] * 5 + [0] * 5, dtype=bool)
    b = np.array([0] * 8 + [1] * 2 + [1] * 5 + [0] * 5, dtype=bool)
    res = mcnemar(a, b)
    assert res.test == "mcnemar_exact"
    assert res.p_value == pytest.approx(0.109375, abs=1e-15)
    assert res.p_value == pytest.approx(stats.binomtest(8, 10, 0.5).pvalue, abs=1e-15)
    assert res.detail == {"n_a_only": 8, "n_b_only": 2}
    assert res.effect == pytest.approx((8 - 2) / 20)


def test_mcnemar_chi2_for_many_discordant():
    # 30 vs 10 discordant (40 >= 25 -> chi-square): (|30 - 10| - 1)^2 / 40 = 361/40 = 9.025.
    a = np.r_[np.ones(30), np.zeros(10), np.ones(7)].astype(bool)
    b = np.r_[np.zeros(30), np.ones(10), np.ones(7)].astype(bool)
    res = mcnemar(a, b)
    assert res.test == "mcnemar_chi2"
    assert res.statistic == pytest.approx(9.025, abs=1e-12)
    assert res.p_value == pytest.approx(stats.chi2.sf(9.025, df=1), rel=1e-12)
    exact = mcnemar(a, b, method="exact")
    assert exact.p_value == pytest.approx(stats.binomtest(30, 40, 0.5).pvalue, rel=1e-12)


def test_mcnemar_no_discordant_and_errors():
    res = mcnemar([1, 0, 1], [1, 0, 1])
    assert res.p_value == 1.0
    with pytest.raises(ValueError, match="equal length"):
        mcnemar([1, 0], [1])
    with pytest.raises(ValueError, match="0/1"):
        mcnemar([2, 0], [1, 0])
    with pytest.raises(ValueError, match="method='fisher'"):
        mcnemar([1], [0], method="fisher")


def test_paired_bootstrap_extremes():
    # a always hits, b never: every resample has difference exactly 1 = observed, so no resample
    # is as far from the observed value as 0 is: p = 1 / (n_boot + 1).
    res = paired_bootstrap(np.ones(30), np.zeros(30), n_boot=999, seed=0)
    assert res.p_value == pytest.approx(1 / 1000)
    assert res.effect == 1.0 and res.detail["ci_low"] == res.detail["ci_high"] == 1.0
    # identical hits: observed difference 0 -> p = 1.
    same = paired_bootstrap([1, 0, 1, 1], [1, 0, 1, 1], n_boot=200, seed=0)
    assert same.p_value == 1.0


def test_paired_bootstrap_ci_matches_scipy_and_is_seeded():
    rng = np.random.default_rng(3)
    a = rng.random(300) < 0.8
    b = rng.random(300) < 0.7
    res = paired_bootstrap(a, b, n_boot=4000, seed=11)
    assert res.effect == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    ref = stats.bootstrap((a.astype(float), b.astype(float)),
                          lambda x, y, axis: np.mean(x - y, axis=axis), paired=True,
                          vectorized=True, n_resamples=4000, method="percentile",
                          rng=np.random.default_rng(5))
    # Different random streams: the percentile CIs agree to Monte-Carlo error (~0.005 here).
    assert res.detail["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=0.01)
    assert res.detail["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=0.01)
    assert paired_bootstrap(a, b, n_boot=4000, seed=11) == res
    # The observed difference (~0.1 on 300 samples) is well outside the null: small p.
    assert res.p_value < 0.01


def test_format_p():
    assert format_p(None) == "—"
    assert format_p(float("nan")) == "—"
    assert format_p(0.0004) == "<0.001"
    assert format_p(0.04567) == "0.046"
