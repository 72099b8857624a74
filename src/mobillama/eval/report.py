"""Evaluation reports: one JSON per run (every task with status, metric, stderr, 95% CI, sample count and
per-sample scores for later paired tests) and a markdown table beside the paper's Table 4."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from mobillama.checkpoint import write_json
from mobillama.errors import MobiLlamaError
from mobillama.eval import stats

REPORT_FORMAT = "mobillama-eval-report/1"

# The paper's Table 4, in the table's column order.
PAPER_COLUMNS = ["HS", "TQA", "MMLU", "ARC-C", "CrowS", "PIQA", "RACE", "SIQA", "Wino"]
PAPER_ROWS = {
    "MobiLlama 0.5B (paper)": [52.52, 38.05, 26.45, 29.52, 64.03, 72.03, 33.68, 40.22, 57.53, 46.00],
    "MobiLlama 0.8B (paper)": [54.09, 38.48, 26.92, 30.20, 64.82, 73.17, 33.37, 41.60, 57.45, 46.67],
    "pythia-410m (paper)": [40.85, 41.22, 27.25, 26.19, 64.20, 67.19, 30.71, 41.40, 53.12, 43.57],
    "opt-350m (paper)": [36.73, 40.83, 26.02, 23.55, 64.12, 64.74, 29.85, 41.55, 52.64, 42.22],
}


def _task_samples(raw: dict, lm_task: str) -> list[tuple[str, dict]]:
    """(lm-eval task name, sample) of a task, or of every subtask of a group (MMLU's subjects)."""
    samples = raw.get("samples", {})
    names = [lm_task] if lm_task in samples else sorted(k for k in samples if k.startswith(lm_task + "_"))
    return [(name, s) for name in names for s in samples[name]]


def _samples(raw: dict, lm_task: str, metric: str) -> tuple[list[str], list[float]]:
    """Per-sample scores of a task (or of every subtask of a group, ids prefixed by the subtask)."""
    ids, scores = [], []
    for name, s in _task_samples(raw, lm_task):
        ids.append(f"{name}/{s['doc_id']}" if name != lm_task else str(s["doc_id"]))
        scores.append(float(s[metric]))
    return ids, scores


def _chance(raw: dict, lm_task: str, metric: str) -> float | None:
    """What a model that cannot tell the choices apart scores on the same documents: 1/choices per
    document for accuracies (WinoGrande's two partial contexts included), the share of true answers for
    TruthfulQA's mc2 (uniform probabilities), 50% for CrowS-Pairs' stereotype rate."""
    if metric == "pct_stereotype":
        return 0.5
    per_doc = []
    for _, s in _task_samples(raw, lm_task):
        labels = (s.get("doc") or {}).get("mc2_targets", {}).get("labels")
        if metric == "acc" and labels:
            per_doc.append(sum(labels) / len(labels))
        elif s.get("arguments"):
            per_doc.append(1 / len(s["arguments"]))
    return sum(per_doc) / len(per_doc) if per_doc else None


def build_report(*, checkpoint: str, specs, raw: dict | None, statuses: dict, settings: dict) -> dict:
    tasks = {}
    for spec in specs:
        lm_task = spec.stock_task if settings.get("online") else spec.offline_task
        status, reason = statuses.get(spec.name, ("ok", ""))
        entry = {
            "column": spec.column,
            "lm_eval_task": lm_task,
            "num_fewshot": spec.num_fewshot,
            "metric": spec.metric,
            "status": status,
        }
        if status != "ok" or raw is None:
            entry["reason"] = reason
            tasks[spec.name] = entry
            continue
        res = raw["results"].get(lm_task, {})
        ids, scores = _samples(raw, lm_task, spec.metric)
        if not scores:
            entry.update(status="failed", reason=f"lm-eval returned no samples for {lm_task}")
            tasks[spec.name] = entry
            continue
        ci = stats.bootstrap_ci(scores, seed=settings.get("seed", 0))
        stderr = res.get(f"{spec.metric}_stderr,none")
        entry.update(
            value=ci["mean"],
            lm_eval_value=res.get(f"{spec.metric},none"),
            stderr=stderr if isinstance(stderr, float) and math.isfinite(stderr) else None,
            ci95=[ci["ci_low"], ci["ci_high"]],
            n=len(scores),
            chance=_chance(raw, lm_task, spec.metric),
            metrics={k.removesuffix(",none"): v for k, v in res.items() if k != "alias"},
            samples={"ids": ids, "scores": scores},
        )
        tasks[spec.name] = entry
    import lm_eval

    done = [t for t in tasks.values() if t["status"] == "ok"]
    return {
        "format": REPORT_FORMAT,
        "checkpoint": checkpoint,
        "settings": settings,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "tasks": tasks,
        "average": {
            "value": sum(t["value"] for t in done) / len(done) if done else None,
            "tasks": len(done),
            "of": len(tasks),
        },
    }


def load_report(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MobiLlamaError(f"report not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MobiLlamaError(f"{path}: not a JSON report ({e})") from None
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        raise MobiLlamaError(f"{path}: not a mobillama eval report (format {REPORT_FORMAT!r} expected)")
    return data


def _cell(task: dict | None) -> str:
    if not task or task.get("status") != "ok":
        return "n/a"
    lo, hi = task["ci95"]
    return f"{100 * task['value']:.2f} ±{100 * (hi - lo) / 2:.1f}"


def format_markdown(report: dict, label: str = "this checkpoint") -> str:
    """The run beside the paper's rows (scores x100; ± is half the 95% bootstrap interval).

    The ``avg`` column of every row is taken over the same columns: the ones this run scored. A paper row's
    nine-task average next to a three-task average of this run would compare different things. The chance
    row is what a model that cannot tell the choices apart scores on the documents this run used."""
    by_col = {t["column"]: t for t in report["tasks"].values()}
    scored = [i for i, c in enumerate(PAPER_COLUMNS) if (by_col.get(c) or {}).get("status") == "ok"]
    avg_name = "avg" if len(scored) == len(PAPER_COLUMNS) else f"avg of the {len(scored)} scored"

    def avg(values: list[float | None]) -> str:
        picked = [values[i] for i in scored]
        if not picked or any(v is None for v in picked):
            return "n/a"
        return f"{sum(picked) / len(picked):.2f}"

    lines = [
        "| model | " + " | ".join(PAPER_COLUMNS) + f" | {avg_name} |",
        "|" + "---|" * (len(PAPER_COLUMNS) + 2),
    ]
    for name, row in PAPER_ROWS.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{v:.2f}" for v in row[: len(PAPER_COLUMNS)]) + f" | {avg(row)} |"
        )
    chance = [
        100 * t["chance"] if t and t.get("status") == "ok" and t.get("chance") is not None else None
        for t in (by_col.get(c) for c in PAPER_COLUMNS)
    ]
    lines.append(
        "| chance (same documents) | "
        + " | ".join("n/a" if v is None else f"{v:.2f}" for v in chance)
        + f" | {avg(chance)} |"
    )
    ours = [100 * by_col[c]["value"] if i in scored else None for i, c in enumerate(PAPER_COLUMNS)]
    lines.append(
        f"| {label} | " + " | ".join(_cell(by_col.get(c)) for c in PAPER_COLUMNS) + f" | {avg(ours)} |"
    )
    lines += [
        "",
        "| task | status | metric | shots | n | value | 95% CI | chance | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in report["tasks"].items():
        if t["status"] == "ok":
            lo, hi = t["ci95"]
            ch = "" if t.get("chance") is None else f"{100 * t['chance']:.2f}"
            lines.append(
                f"| {name} | ok | {t['metric']} | {t['num_fewshot']} | {t['n']} | {100 * t['value']:.2f} | "
                f"[{100 * lo:.2f}, {100 * hi:.2f}] | {ch} | |"
            )
        else:
            lines.append(
                f"| {name} | {t['status']} | {t['metric']} | {t['num_fewshot']} | | | | | {t.get('reason', '')} |"
            )
    if report["settings"].get("limit"):
        lines += [
            "",
            f"Run with --limit {report['settings']['limit']}: not comparable with full-benchmark numbers.",
        ]
    return "\n".join(lines) + "\n"


def prepare_out_path(out: str | Path, *, overwrite: bool = False, with_markdown: bool = True) -> Path:
    """Check ``--out`` and create its missing parent folders *before* a run, so that a path that cannot
    be written fails at once in one line instead of after hours of scoring."""
    out = Path(out)
    targets = [out, out.with_suffix(".md")] if with_markdown else [out]
    for path in targets:
        if path.is_dir():
            raise MobiLlamaError(f"--out {out}: {path} is a directory; give a file name such as report.json")
    if out.exists() and not overwrite:
        raise MobiLlamaError(f"output {out} already exists (pass --overwrite to replace it)")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), parent)
        raise MobiLlamaError(f"--out {out}: cannot create folder {parent}: {blocker} is a file") from None
    except OSError as e:
        raise MobiLlamaError(f"--out {out}: cannot create folder {parent} ({e.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MobiLlamaError(f"--out {out}: folder {parent} is not writable")
    return out


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    """Write ``out`` (JSON) and the markdown table beside it (same name, ``.md``); atomic per file, and
    parent folders are created."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = out.with_suffix(".md")
    write_json(out, report)
    tmp = md.with_name(f".{md.name}.tmp-{os.getpid()}")
    tmp.write_text(format_markdown(report), encoding="utf-8")
    os.replace(tmp, md)
    return out, md


def compare_reports(
    path_a: str | Path, path_b: str | Path, *, iters: int = stats.DEFAULT_ITERS, seed: int = 0
) -> dict:
    """Paired bootstrap (B − A) over the tasks both reports evaluated, on the items both scored."""
    a, b = load_report(path_a), load_report(path_b)
    tasks_a, tasks_b, skipped = {}, {}, []
    for name, ta in a["tasks"].items():
        tb = b["tasks"].get(name)
        if ta.get("status") != "ok" or not tb or tb.get("status") != "ok":
            skipped.append(name)
            continue
        sb = dict(zip(tb["samples"]["ids"], tb["samples"]["scores"]))
        common = [(i, s) for i, s in zip(ta["samples"]["ids"], ta["samples"]["scores"]) if i in sb]
        if not common:
            raise MobiLlamaError(
                f"task {name}: the two reports share no scored items (different data or --limit?)"
            )
        tasks_a[name] = [s for _, s in common]
        tasks_b[name] = [sb[i] for i, _ in common]
    if not tasks_a:
        raise MobiLlamaError(f"{path_a} and {path_b} have no evaluated task in common")
    result = stats.paired_bootstrap(tasks_a, tasks_b, iters=iters, seed=seed)
    result.update(a=str(path_a), b=str(path_b), skipped=skipped)
    return result


def format_comparison(result: dict) -> str:
    lines = [
        f"B − A, paired bootstrap ({result['iters']} resamples); A = {result['a']}, B = {result['b']}",
        "| task | n | A | B | B − A | 95% CI | p |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t in result["tasks"].items():
        lines.append(
            f"| {name} | {t['n']} | {100 * t['a']:.2f} | {100 * t['b']:.2f} | {100 * t['diff']:+.2f} | "
            f"[{100 * t['ci_low']:+.2f}, {100 * t['ci_high']:+.2f}] | {t['p_value']:.4f} |"
        )
    av = result["average"]
    lines.append(
        f"| average | | | | {100 * av['diff']:+.2f} | [{100 * av['ci_low']:+.2f}, {100 * av['ci_high']:+.2f}] "
        f"| {av['p_value']:.4f} |"
    )
    if result["skipped"]:
        lines.append(f"not compared (not evaluated in both): {', '.join(result['skipped'])}")
    return "\n".join(lines) + "\n"
