"""Intervals and paired tests of the compare report, against values worked out by hand."""

import math

import pytest

from graftlm.compare.stats import bootstrap_interval, mcnemar_exact, paired_bootstrap, wilson_interval


def test_wilson_interval_matches_the_formula_and_stays_inside_0_1():
    low, high = wilson_interval(41, 100)
    assert (round(low, 4), round(high, 4)) == (0.3187, 0.5080)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    narrow, wide = wilson_interval(150, 300), wilson_interval(5, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_mcnemar_exact_counts_discordant_pairs():
    reference = [True] * 10 + [False] * 10
    other = [True] * 8 + [False] * 2 + [True] * 7 + [False] * 3
    test = mcnemar_exact(reference, other)
    assert (test["only_other"], test["only_reference"]) == (7, 2)
    expected = 2 * sum(math.comb(9, k) for k in range(3)) / 2**9
    assert test["p"] == pytest.approx(expected)
    assert mcnemar_exact(reference, reference)["p"] == 1.0
    with pytest.raises(ValueError, match="different sizes"):
        mcnemar_exact([True], [True, False])


def test_paired_bootstrap_separates_a_real_difference_from_none():
    reference = [0.0] * 100
    better = [1.0] * 30 + [0.0] * 70
    result = paired_bootstrap(reference, better, samples=4000)
    assert result["mean"] == pytest.approx(0.3) and result["low"] > 0.15 and result["p"] < 0.01
    same = paired_bootstrap(better, better)
    assert same["p"] == 1.0 and same["mean"] == 0.0
    noisy = paired_bootstrap([0.0, 1.0] * 50, [1.0, 0.0] * 50, samples=4000)
    assert noisy["p"] > 0.5 and noisy["low"] < 0 < noisy["high"]
    low, high = bootstrap_interval([1.0] * 30 + [0.0] * 70, samples=4000)
    assert low < 0.3 < high and high - low < 0.25
