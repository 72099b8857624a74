"""Aggregation across seeds: mean and a 95% confidence interval (Student's t), and paired differences."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as _scipy_stats  # t quantiles; scipy is the standard place for them


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a t-interval over independent runs (seeds). One value gives a zero-width interval."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _scipy_stats.t.ppf(0.5 + confidence / 2, df=n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Seed-paired difference a - b: mean, t-interval, and the two-sided p-value of a paired t-test."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("paired_difference needs two equal-length sequences of at least 2 values")
    diffs = [x - y for x, y in zip(a, b)]
    mean, low, high = mean_ci(diffs, confidence)
    p = float(_scipy_stats.ttest_rel(a, b).pvalue)
    return {"mean": mean, "low": low, "high": high, "p_value": p}
