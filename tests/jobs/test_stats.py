"""Intervals and verdicts: known values, coverage, an independent implementation."""

from __future__ import annotations

import numpy as np
import pytest

from jobs import stats


def test_wilson_matches_the_textbook_values_and_statsmodels_formula():
    # InvGAN's BPDA cell of issue 22: 5 of 20 -> [0.11, 0.47]
    i = stats.wilson(5, 20)
    assert i.value == 0.25 and round(i.low, 2) == 0.11 and round(i.high, 2) == 0.47
    # Brown, Cai & DasGupta (2001): the interval stays inside [0, 1] at the edges and is not degenerate there
    zero, full = stats.wilson(0, 10), stats.wilson(10, 10)
    assert zero.low == 0 and 0.27 < zero.high < 0.28 and full.high == 1 and 0.72 < full.low < 0.73
    assert stats.wilson(0, 0).n == 0 and stats.wilson(0, 0).low == 0 and stats.wilson(0, 0).high == 1


def test_wilson_covers_the_true_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    for p, n in [(0.3, 20), (0.9, 50), (0.05, 100)]:
        k = rng.binomial(n, p, size=4000)
        covered = np.mean([p in stats.wilson(int(x), n) for x in k])
        assert 0.92 < covered < 0.99, (p, n, covered)


def test_bootstrap_auc_is_sklearns_auc_with_an_interval_that_narrows_with_n():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 400):
        labels = np.r_[np.ones(n), np.zeros(n)]
        scores = np.r_[rng.normal(1, 1, n), rng.normal(0, 1, n)].round(1)  # ties, as detection scores have
        i = stats.bootstrap_auc(labels, scores, resamples=500)
        assert i.value == pytest.approx(roc_auc_score(labels, scores))
        assert i.low < i.value < i.high and i.n == n
        widths.append(i.high - i.low)
    assert widths[1] < widths[0] / 3  # ~1/sqrt(20)
    # the rank formula equals sklearn's AUC on one resample with ties
    a = np.array([[0.1, 0.4, 0.4, 0.2, 0.4, 0.1]])
    r = stats._average_ranks(a)
    from scipy.stats import rankdata

    np.testing.assert_array_equal(r[0], rankdata(a[0]))
    with pytest.raises(ValueError, match="both"):
        stats.bootstrap_auc([1, 1], [0.2, 0.3])


def test_decimals_follow_the_interval_width():
    assert stats.decimals(stats.Interval(0.9, 0.8, 0.98, 20)) == 2
    assert stats.decimals(stats.Interval(0.9, 0.89, 0.91, 2000)) == 3
    assert stats.decimals(stats.Interval(0.9, 0.899, 0.9005, 10**6)) == 4


@pytest.mark.parametrize(
    ("k", "n", "paper", "expected"),
    [
        (5, 19, 0.25, "n too small"),
        (5, 20, 0.25, "undecided"),  # half-width 0.18 > 0.10
        (25, 100, 0.30, "reproduced"),  # [0.18, 0.35]
        (25, 100, 0.40, "not reproduced (below)"),
        (25, 100, 0.10, "not reproduced (above)"),
        (25, 100, None, ""),
    ],
)
def test_four_verdicts_in_their_order(k, n, paper, expected):
    assert stats.verdict(stats.wilson(k, n), paper) == expected


def test_format_interval():
    assert stats.format_interval(stats.wilson(25, 100)) == "0.25 [0.18, 0.34] (n=100)"


def test_paired_difference_known_answers_and_coverage():
    """The mean of the per-example differences; identical outcomes give [0, 0]; over simulated pairs with a known
    difference the 95 % paired bootstrap interval covers it about 95 % of the time (n = 100)."""
    a = np.array([1, 1, 1, 0] * 10, dtype=bool)
    b = np.ones(40, dtype=bool)
    d = stats.paired_difference(a, b)
    assert d.value == pytest.approx(-0.25) and d.n == 40 and d.high < 0  # 10 of 40 lost: clearly below 0
    same = stats.paired_difference(a, a)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    assert stats.verdict(same, 0.0) == "reproduced" and stats.verdict(d, 0.0) == "undecided"  # ±0.13 at n = 40
    big = stats.paired_difference(np.tile(a, 10), np.tile(b, 10))  # n = 400: ±0.04
    assert big.half_width < 0.06 and stats.verdict(big, 0.0) == "not reproduced (below)"
    assert stats.verdict(stats.paired_difference(a[:8], b[:8]), 0.0) == "n too small"
    rng = np.random.default_rng(1)
    covered, trials = 0, 300
    for t in range(trials):  # A right with p 0.8, B with 0.7, correlated through a shared draw
        u = rng.random(100)
        x, y = u < 0.8, (u < 0.7) ^ (rng.random(100) < 0.05)
        true = 0.8 - (0.7 * 0.95 + 0.3 * 0.05)
        i = stats.paired_difference(x, y, resamples=500, seed=t)
        covered += i.low <= true <= i.high
    assert 0.90 <= covered / trials <= 0.99


def test_tally_counts_each_verdict_and_splits_not_reproduced():
    verdicts = ["reproduced"] * 3 + ["not reproduced (above)", "not reproduced (below)", "not reproduced (below)"]
    verdicts += ["undecided", "", "n too small"]
    assert stats.tally(verdicts) == "reproduced 3, not reproduced 3 (1 above, 2 below), undecided 1, n too small 1"
    assert stats.tally(["", ""]) == "" and stats.tally(["undecided"]) == "undecided 1"
