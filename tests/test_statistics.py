"""Intervals, paired tests and spreads against values computed by hand."""

from __future__ import annotations

import math

import pytest

from shortlvlm_vllm.evaluation.statistics import (
    Spread,
    accuracy,
    compare_paired,
    holm,
    mcnemar_exact,
    mean_and_spread,
    paired_bootstrap,
    wilson_interval,
)


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.959964: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.71674,
    # half-width z sqrt(0.016 + z^2/400) / (1 + z^2/10) = 0.22658.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=2e-5) and high == pytest.approx(0.94332, abs=2e-5)


def test_wilson_interval_at_the_edges():
    # 0 of 10: [0, z^2/10 / (1 + z^2/10)] = [0, 0.277533]; all right mirrors it.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)


def test_wilson_interval_narrows_with_the_whole_test_split():
    low, high = wilson_interval(4836, 5000)  # the toy's 96.7%
    assert high - low == pytest.approx(2 * 1.959964 * math.sqrt(0.9672 * 0.0328 / 5000), rel=0.02)


def test_wilson_interval_refuses_impossible_counts():
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_mcnemar_exact_by_hand():
    # 1 vs 9 discordant: 2 (C(10,0) + C(10,1)) / 2^10 = 22 / 1024.
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(9, 1) == pytest.approx(22 / 1024)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    # 3 vs 3: the tail holds more than half the mass; capped at 1.
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 0) == 1.0


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 -> 3 x 0.01 = 0.03, 2 x 0.02 = 0.04, 1 x 0.04 = 0.04 (kept monotone), in input order.
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_paired_bootstrap_of_a_constant_difference_is_exact():
    assert paired_bootstrap([1.0] * 50, [0.25] * 50) == pytest.approx((0.75, 0.75, 0.75))


def test_paired_bootstrap_matches_the_normal_interval_on_many_items():
    # Differences d_i alternating +1, -1, 0, 0: mean 0, variance 1/2; half-width z sqrt(0.5 / n).
    n = 4000
    a = [1.0, 0.0, 0.0, 1.0] * (n // 4)
    b = [0.0, 1.0, 0.0, 1.0] * (n // 4)
    mean, low, high = paired_bootstrap(a, b, resamples=4000, seed=1)
    assert mean == 0.0
    assert (high - low) / 2 == pytest.approx(1.959964 * math.sqrt(0.5 / n), rel=0.1)


def test_compare_paired_counts_the_discordant_questions():
    a = [True] * 10 + [True] * 9 + [False] * 1 + [False] * 80
    b = [True] * 10 + [False] * 9 + [True] * 1 + [False] * 80
    result = compare_paired(a, b)
    assert (result.only_a, result.only_b) == (9, 1)
    assert result.difference == pytest.approx(0.08)
    assert result.p_value == pytest.approx(22 / 1024)
    assert result.low < 0.08 < result.high


def test_compare_paired_refuses_different_question_sets():
    with pytest.raises(ValueError, match="not the same ones"):
        compare_paired([True, False], [True])


def test_accuracy_carries_its_interval():
    result = accuracy([True] * 8 + [False] * 2)
    assert result.value == 0.8 and (result.low, result.high) == pytest.approx(wilson_interval(8, 10))


def test_spread_median_range_and_separation():
    fast, slow, near = Spread((10.0, 12.0, 11.0)), Spread((7.0, 8.0, 9.5, 6.0)), Spread((9.0, 10.5, 9.8))
    assert fast.median == 11.0 and slow.median == 7.5
    assert (slow.low, slow.high) == (6.0, 9.5)
    assert fast.separated_from(slow) and slow.separated_from(fast)
    assert not fast.separated_from(near)  # 10.0..12.0 and 9.0..10.5 overlap: inside the noise


def test_mean_and_spread_by_hand():
    # 0.90, 0.92, 0.97: mean 0.93, sample sd sqrt((0.0009 + 0.0001 + 0.0016) / 2) = sqrt(0.0013).
    result = mean_and_spread([0.90, 0.92, 0.97])
    assert result["mean"] == pytest.approx(0.93) and result["sd"] == pytest.approx(math.sqrt(0.0013), abs=1e-6)
    assert (result["min"], result["max"], result["n"]) == (0.90, 0.97, 3)
