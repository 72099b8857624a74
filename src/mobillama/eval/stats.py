"""Bootstrap statistics over per-sample scores: confidence intervals and paired tests between checkpoints.

The paper reports a 2.4-point average gain with no significance test. Benchmarks with a few hundred to a
few thousand items carry sampling noise of one to three points, so every score here comes with a 95%
percentile-bootstrap interval, and two result files can be compared with a *paired* bootstrap (the same
items resampled for both models), which is far tighter than comparing two independent intervals.
Written with numpy rather than scipy.stats.bootstrap because the paired, multi-task average needs
resampling each task separately with shared indices for both models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mobillama.errors import MobiLlamaError

DEFAULT_ITERS = 10_000
_CHUNK = 1_000  # resamples drawn at once: bounds memory at CHUNK x n indices


def _as_array(scores: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise MobiLlamaError(f"{what}: need a non-empty 1-D list of per-sample scores")
    if not np.all(np.isfinite(arr)):
        raise MobiLlamaError(f"{what}: per-sample scores contain NaN or infinity")
    return arr


def _resampled_means(arr: np.ndarray, iters: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty(iters)
    for start in range(0, iters, _CHUNK):
        k = min(_CHUNK, iters - start)
        idx = rng.integers(0, arr.size, size=(k, arr.size))
        out[start : start + k] = arr[idx].mean(axis=1)
    return out


def bootstrap_ci(
    scores: Sequence[float], *, iters: int = DEFAULT_ITERS, confidence: float = 0.95, seed: int = 0
) -> dict:
    """Mean and percentile-bootstrap confidence interval of per-sample scores."""
    arr = _as_array(scores, "bootstrap_ci")
    means = _resampled_means(arr, iters, np.random.default_rng(seed))
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(arr.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(arr.size)}


def paired_bootstrap(
    tasks_a: dict[str, Sequence[float]],
    tasks_b: dict[str, Sequence[float]],
    *,
    iters: int = DEFAULT_ITERS,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Paired bootstrap of B − A per task and for the unweighted average over tasks.

    ``tasks_a[t][i]`` and ``tasks_b[t][i]`` must score the same item. Each iteration resamples every
    task's items once and applies the same indices to both models; the average row averages the task
    differences within each iteration, so it tests the "average gain" a table reports. The p-value is
    two-sided: twice the share of resampled differences on the other side of zero (capped at 1).
    """
    if set(tasks_a) != set(tasks_b):
        raise MobiLlamaError(
            f"paired test needs the same tasks on both sides: {sorted(tasks_a)} vs {sorted(tasks_b)}"
        )
    if not tasks_a:
        raise MobiLlamaError("paired test: no tasks to compare")
    rng = np.random.default_rng(seed)
    tail = (1 - confidence) / 2 * 100
    per_task, diffs_by_task = {}, []
    for task in sorted(tasks_a):
        a = _as_array(tasks_a[task], f"task {task} (A)")
        b = _as_array(tasks_b[task], f"task {task} (B)")
        if a.size != b.size:
            raise MobiLlamaError(f"task {task}: {a.size} items in A but {b.size} in B; pair the same items")
        d = _resampled_means(b - a, iters, rng)
        diffs_by_task.append(d)
        per_task[task] = _summary(float((b - a).mean()), d, tail, a.size)
        per_task[task].update(a=float(a.mean()), b=float(b.mean()))
    avg = np.mean(diffs_by_task, axis=0)
    observed = float(np.mean([per_task[t]["diff"] for t in per_task]))
    return {"tasks": per_task, "average": _summary(observed, avg, tail, None), "iters": iters, "seed": seed}


def _summary(observed: float, resampled: np.ndarray, tail: float, n: int | None) -> dict:
    lo, hi = np.percentile(resampled, [tail, 100 - tail])
    p = min(1.0, 2 * min(float(np.mean(resampled <= 0)), float(np.mean(resampled >= 0))))
    out = {"diff": observed, "ci_low": float(lo), "ci_high": float(hi), "p_value": p}
    if n is not None:
        out["n"] = int(n)
    return out


def bootstrap_task_average(
    tasks: dict[str, Sequence[float]], *, iters: int = DEFAULT_ITERS, confidence: float = 0.95, seed: int = 0
) -> dict:
    """Unweighted average of per-task means, with a bootstrap interval that resamples every task's items.

    This is the interval of the "average" column a results table reports: tasks of different sizes count
    equally, and each iteration resamples each task independently.
    """
    if not tasks:
        raise MobiLlamaError("bootstrap_task_average: no tasks")
    rng = np.random.default_rng(seed)
    arrays = {t: _as_array(s, f"task {t}") for t, s in sorted(tasks.items())}
    resampled = np.mean([_resampled_means(a, iters, rng) for a in arrays.values()], axis=0)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(resampled, [tail, 100 - tail])
    mean = float(np.mean([a.mean() for a in arrays.values()]))
    return {"mean": mean, "ci_low": float(lo), "ci_high": float(hi), "tasks": len(arrays)}
