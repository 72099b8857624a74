import math

import pytest

from mobillama.study.report import mean_ci, paired_difference


def test_mean_ci_known_values():
    # values 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653; half width = 4.302653 / sqrt(3)
    mean, low, high = mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert mean == 2.0
    assert low == pytest.approx(2.0 - half) and high == pytest.approx(2.0 + half)


def test_mean_ci_single_value_and_empty():
    assert mean_ci([5.0]) == (5.0, 5.0, 5.0)
    with pytest.raises(ValueError):
        mean_ci([])


def test_paired_difference_known_values():
    a, b = [3.0, 4.0, 5.0, 6.0], [1.0, 2.5, 3.0, 4.5]
    r = paired_difference(a, b)  # diffs 2, 1.5, 2, 1.5: mean 1.75, sd 0.288675
    assert r["mean"] == pytest.approx(1.75)
    half = 3.182446305284263 * 0.28867513459481287 / 2
    assert r["low"] == pytest.approx(1.75 - half) and r["high"] == pytest.approx(1.75 + half)
    assert r["p_value"] == pytest.approx(0.0012077, rel=1e-3)  # t = 12.124 on 3 df
    with pytest.raises(ValueError):
        paired_difference([1.0], [2.0])
