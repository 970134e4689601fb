"""Statistics of the benchmark protocol against values computed by hand."""
from __future__ import annotations

import math
import statistics

import pytest

from distopt.bench import stats


def test_median_with_misses():
    assert stats.median([3.0, 1.0, 2.0]) == 2.0
    assert stats.median([1.0, 3.0]) == 2.0
    assert stats.median([1.0, math.inf, math.inf]) == math.inf  # most seeds missed
    assert stats.median([1.0, 2.0, math.inf]) == 2.0
    assert math.isnan(stats.median([]))


def test_bootstrap_ci_degenerate_and_deterministic():
    assert stats.bootstrap_ci([0.7]) == (0.7, 0.7)
    assert stats.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert all(math.isnan(v) for v in stats.bootstrap_ci([]))
    a = stats.bootstrap_ci([1.0, 2.0, 4.0], seed=3)
    assert a == stats.bootstrap_ci([1.0, 2.0, 4.0], seed=3)
    assert 1.0 <= a[0] <= statistics.fmean([1.0, 2.0, 4.0]) <= a[1] <= 4.0


def test_bootstrap_ci_matches_normal_approximation():
    # 100 Bernoulli values with p = 0.5: the mean's 95 % CI is about 0.5 ± 1.96 * sqrt(0.25 / 100) = 0.5 ± 0.098
    values = [0.0] * 50 + [1.0] * 50
    lo, hi = stats.bootstrap_ci(values, n_boot=4000, seed=1)
    assert lo == pytest.approx(0.402, abs=0.02) and hi == pytest.approx(0.598, abs=0.02)
    # three seeds: resamples (1,1,1) and (3,3,3) each have probability 1/27 = 3.7 % > 2.5 %, so with
    # 4000 resamples (~148 each, far above the 100 below the 2.5 % quantile) the CI is exactly [1, 3]
    assert stats.bootstrap_ci([1.0, 2.0, 3.0], n_boot=4000, seed=0) == (1.0, 3.0)
    # five seeds: (v,v,v,v,v) has probability 1/3125, so the CI is strictly inside [min, max]
    lo, hi = stats.bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0], n_boot=4000, seed=0)
    assert 1.0 < lo < 3.0 < hi < 5.0


def test_quantile_interpolates():
    assert stats._quantile([0.0, 10.0], 0.25) == 2.5
    assert stats._quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert stats._quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5


def test_steps_to_target():
    steps, acc = [0, 10, 20, 30], [0.1, 0.5, 0.8, 0.9]
    assert stats.steps_to_target(steps, acc, 0.8, higher_is_better=True) == 20
    assert stats.steps_to_target(steps, acc, 0.95, higher_is_better=True) == math.inf
    loss = [4.0, 3.0, math.nan, 1.5]
    assert stats.steps_to_target(steps, loss, 2.0, higher_is_better=False) == 30  # NaN never reaches
    assert stats.steps_to_target(steps, loss, 3.0, higher_is_better=False) == 10


def test_performance_profile_and_score():
    times = {"A": {"w1": 10.0, "w2": 20.0}, "B": {"w1": 20.0, "w2": 10.0}, "C": {"w1": 40.0, "w2": math.inf}}
    taus = [1.0, 2.0, 4.0]
    prof = stats.performance_profile(times, taus)
    assert prof["A"] == [0.5, 1.0, 1.0]
    assert prof["B"] == [0.5, 1.0, 1.0]
    assert prof["C"] == [0.0, 0.0, 0.5]  # 4x the best on w1, never on w2
    # trapezoids: (2-1)(0.5+1)/2 + (4-2)(1+1)/2 = 2.75, divided by 4 - 1
    assert stats.profile_score(prof["A"], taus) == pytest.approx(2.75 / 3)
    assert stats.profile_score(prof["C"], taus) == pytest.approx((0 + 2 * 0.25) / 3)
    unsolved = stats.performance_profile({"A": {"w": math.inf}, "B": {"w": math.inf}}, taus)
    assert unsolved == {"A": [0.0, 0.0, 0.0], "B": [0.0, 0.0, 0.0]}


def test_lr_sensitivity_width():
    lrs = [1.0, 2.0, 4.0, 8.0, 16.0]
    acc = [0.5, 0.9, 0.95, 0.94, 0.6]
    assert stats.lr_sensitivity_width(lrs, acc, 0.02, higher_is_better=True) == pytest.approx(1.0)  # 4..8
    assert stats.lr_sensitivity_width(lrs, acc, 0.06, higher_is_better=True) == pytest.approx(2.0)  # 2..8
    assert stats.lr_sensitivity_width(lrs, acc, 0.0, higher_is_better=True) == 0.0
    loss = [3.0, 2.05, 2.0, math.nan, 2.01]  # a diverged point breaks the range
    assert stats.lr_sensitivity_width(lrs, loss, 0.1, higher_is_better=False) == pytest.approx(1.0)  # 2..4
    assert stats.lr_sensitivity_width(list(reversed(lrs)), list(reversed(acc)), 0.02, True) == pytest.approx(1.0)
    assert math.isnan(stats.lr_sensitivity_width(lrs, [math.nan] * 5, 0.1, True))


def test_ranks_and_rank_correlations():
    assert stats.ranks([10.0, 30.0, 20.0, 30.0]) == [1.0, 3.5, 2.0, 3.5]
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 6.0, 7.0, 8.0, 7.0]
    # ranks of y: 1, 2, 3.5, 5, 3.5; Σdxdy = 8, Σdx² = 10, Σdy² = 9.5 -> 8 / sqrt(95)
    assert stats.spearman(x, y) == pytest.approx(8 / math.sqrt(95))
    # 8 concordant, 1 discordant, 1 pair tied in y only -> (8 - 1) / sqrt(9 * 10)
    assert stats.kendall(x, y) == pytest.approx(7 / math.sqrt(90))
    assert stats.spearman(x, list(reversed(x))) == pytest.approx(-1.0)
    assert stats.kendall(x, x) == pytest.approx(1.0)
    assert math.isnan(stats.spearman([1.0, 2.0], [3.0, 3.0]))
    with pytest.raises(ValueError):
        stats.kendall([1.0], [1.0, 2.0])


def test_rank_correlations_match_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    x = [0.3, 0.1, 0.4, 0.1, 0.5, 0.9, 0.2, 0.6]
    y = [0.2, 0.2, 0.5, 0.1, 0.4, 0.8, 0.3, 0.9]
    assert stats.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
    assert stats.kendall(x, y) == pytest.approx(scipy_stats.kendalltau(x, y).statistic)
