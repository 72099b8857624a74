"""Bootstrap intervals and the paired test on inputs whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from mobillama.errors import MobiLlamaError
from mobillama.eval.stats import bootstrap_ci, bootstrap_task_average, paired_bootstrap


def test_ci_of_constant_scores_is_a_point():
    ci = bootstrap_ci([1.0] * 50, iters=500)
    assert ci == {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 50}


def test_ci_matches_normal_approximation_for_binary_scores():
    rng = np.random.default_rng(0)
    scores = (rng.random(2000) < 0.3).astype(float)
    ci = bootstrap_ci(scores, iters=4000, seed=1)
    p, n = scores.mean(), scores.size
    half = 1.96 * np.sqrt(p * (1 - p) / n)  # ~0.020
    assert ci["ci_low"] == pytest.approx(p - half, abs=0.003)
    assert ci["ci_high"] == pytest.approx(p + half, abs=0.003)
    assert ci["ci_low"] < p < ci["ci_high"]


def test_ci_is_deterministic_given_seed():
    scores = np.random.default_rng(3).random(30).tolist()
    assert bootstrap_ci(scores, iters=300, seed=7) == bootstrap_ci(scores, iters=300, seed=7)
    assert bootstrap_ci(scores, iters=300, seed=7) != bootstrap_ci(scores, iters=300, seed=8)


def test_paired_identical_models_no_difference():
    a = {"t": [0, 1, 1, 0, 1]}
    res = paired_bootstrap(a, a, iters=500)
    assert res["tasks"]["t"]["diff"] == 0 and res["tasks"]["t"]["p_value"] == 1.0
    assert res["average"]["ci_low"] == res["average"]["ci_high"] == 0


def test_paired_clear_improvement_is_significant():
    rng = np.random.default_rng(0)
    a = (rng.random(500) < 0.5).astype(float)
    b = a.copy()
    flip = rng.choice(np.flatnonzero(a == 0), 60, replace=False)  # B fixes 60 of A's errors, breaks none
    b[flip] = 1
    res = paired_bootstrap({"t": a}, {"t": b}, iters=2000)
    t = res["tasks"]["t"]
    assert t["diff"] == pytest.approx(60 / 500)
    assert t["p_value"] < 0.001 and t["ci_low"] > 0


def test_paired_noise_is_not_significant_and_pairing_matters():
    rng = np.random.default_rng(1)
    a = (rng.random(300) < 0.5).astype(float)
    b = a.copy()
    b[:6] = 1 - b[:6]  # a handful of items change in both directions
    res = paired_bootstrap({"t": a}, {"t": b}, iters=2000)
    assert res["tasks"]["t"]["p_value"] > 0.05


def test_average_row_averages_task_differences():
    a = {"x": [0.0] * 10, "y": [1.0] * 10}
    b = {"x": [1.0] * 10, "y": [1.0] * 10}
    res = paired_bootstrap(a, b, iters=200)
    assert res["average"]["diff"] == pytest.approx(0.5)
    assert res["average"]["ci_low"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "a,b,match",
    [
        ({"t": [1, 0]}, {"u": [1, 0]}, "same tasks"),
        ({"t": [1, 0]}, {"t": [1, 0, 1]}, "2 items in A but 3 in B"),
        ({"t": []}, {"t": []}, "non-empty"),
        ({"t": [1, float("nan")]}, {"t": [1, 0]}, "NaN"),
        ({}, {}, "no tasks"),
    ],
)
def test_paired_bad_input(a, b, match):
    with pytest.raises(MobiLlamaError, match=match):
        paired_bootstrap(a, b, iters=10)


def test_task_average_weights_tasks_equally_and_brackets_the_mean():
    # a 10-item task at 1.0 and a 1000-item task at 0.0: the unweighted average is 0.5, not ~0.01
    constant = bootstrap_task_average({"small": [1.0] * 10, "big": [0.0] * 1000}, iters=200)
    assert constant == {"mean": 0.5, "ci_low": 0.5, "ci_high": 0.5, "tasks": 2}
    rng = np.random.default_rng(0)
    tasks = {"a": (rng.random(400) < 0.3).astype(float), "b": (rng.random(400) < 0.7).astype(float)}
    avg = bootstrap_task_average(tasks, iters=3000, seed=2)
    assert avg["mean"] == pytest.approx((tasks["a"].mean() + tasks["b"].mean()) / 2)
    # the average of two independent binomial means: sd = sqrt(p(1-p)/n + q(1-q)/n) / 2
    sd = np.sqrt(0.21 / 400 + 0.21 / 400) / 2
    assert avg["ci_high"] - avg["ci_low"] == pytest.approx(2 * 1.96 * sd, rel=0.15)
    with pytest.raises(MobiLlamaError, match="no tasks"):
        bootstrap_task_average({})
    with pytest.raises(MobiLlamaError, match="task b"):
        bootstrap_task_average({"a": [1.0], "b": []})
