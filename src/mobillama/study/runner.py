"""Run the study: every arm x seed through the project's own pre-training, then aggregate.

A study is one YAML file (see ``studies/small.yaml``): the shared model's shape, the token budget per
run, the seeds, the prepared data and a base training recipe. Each run is an ordinary pre-training run
directory (``OUT/ARM/seed-N``) with its recipe, manifest link, checkpoints list and metrics, so every
number in the report traces back to a run the study wrote. A run whose final checkpoint exists is not
run again: the study can be stopped and continued run by run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mobillama.checkpoint import write_json
from mobillama.config import ModelConfig
from mobillama.data.shards import load_manifest
from mobillama.errors import MobiLlamaError
from mobillama.eval import stats
from mobillama.eval.data import DEFAULT_DATA_DIR
from mobillama.eval.perplexity import evaluate_perplexity
from mobillama.eval.suites import get_suite, run_suite
from mobillama.model import MobiLlama, causal_lm_loss
from mobillama.study.arms import Arm, build_arms
from mobillama.study.report import mean_ci, paired_difference
from mobillama.train.metrics import plot_runs, read_metrics
from mobillama.train.pretrain import run_pretrain
from mobillama.train.recipe import load_recipe
from mobillama.train.share import share_checkpoint
from mobillama.train.state import list_checkpoints


@dataclass
class StudyConfig:
    name: str
    data: str
    model: dict[str, Any]
    tokens_per_run: int
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    recipe: str = "tiny-cpu"
    recipe_overrides: list[str] = field(default_factory=list)
    arms: list[str] | None = None  # None: all arms
    out_dir: str | None = None
    tolerance: float = 0.02
    eval_samples: int | None = None  # limit of validation samples for the final perplexity (None: all)
    bench_limit: int = 200  # items per task of the quick benchmark suite per run (0: skip the benchmarks)
    bench_data: str | None = None  # benchmark data directory (default: 'mobillama eval fetch-data's cache)

    @property
    def out(self) -> Path:
        return Path(self.out_dir or f"runs/study/{self.name}")


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise MobiLlamaError(f"study config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise MobiLlamaError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise MobiLlamaError(f"{path}: expected a mapping")
    data.update(overrides or {})
    known = set(StudyConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise MobiLlamaError(f"{path}: unknown study key {unknown[0]!r}")
    missing = [k for k in ("name", "data", "model", "tokens_per_run") if k not in data]
    if missing:
        raise MobiLlamaError(f"{path}: missing study key {missing[0]!r}")
    study = StudyConfig(**data)
    if not isinstance(study.tokens_per_run, int) or study.tokens_per_run <= 0:
        raise MobiLlamaError(f"{path}: 'tokens_per_run' must be a positive integer")
    if not study.seeds or not all(isinstance(s, int) for s in study.seeds):
        raise MobiLlamaError(f"{path}: 'seeds' must be a non-empty list of integers")
    if not isinstance(study.bench_limit, int) or study.bench_limit < 0:
        raise MobiLlamaError(f"{path}: 'bench_limit' must be a non-negative integer")
    return study


def study_arms(study: StudyConfig) -> list[Arm]:
    base = ModelConfig.from_dict(study.model, source="study key 'model'", strict=True)
    arms = build_arms(base, tolerance=study.tolerance)
    if study.arms is not None:
        names = {a.name for a in arms}
        bad = [a for a in study.arms if a not in names]
        if bad:
            raise MobiLlamaError(f"unknown arm {bad[0]!r}; arms are: {', '.join(sorted(names))}")
        wanted = set(study.arms) | {a.init_from for a in arms if a.name in study.arms and a.init_from}
        arms = [a for a in arms if a.name in wanted]
    return arms


def _final_checkpoint(run_dir: Path, max_steps: int) -> Path | None:
    done = [c for c in list_checkpoints(run_dir) if int(c.name.split("-")[-1]) >= max_steps]
    return done[-1] if done else None


def run_study(study: StudyConfig, say=print) -> dict[str, Any]:
    """Train every missing run, evaluate every run, write ``results.json`` and ``report.md``."""
    arms = study_arms(study)
    out = study.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.yaml").write_text(yaml.safe_dump(vars(study) | {"out_dir": str(out)}, sort_keys=False))
    probe = load_recipe(study.recipe, [f"data.path={study.data}", *study.recipe_overrides])
    max_steps = max(1, study.tokens_per_run // probe.batch.global_batch_tokens)
    finals: dict[tuple[str, int], Path] = {}
    for seed in study.seeds:
        for arm in sorted(arms, key=lambda a: a.init_from is not None):  # init arms after their sources
            run_dir = out / arm.name / f"seed-{seed}"
            final = _final_checkpoint(run_dir, max_steps)
            if final is None:
                say(f"\n== {arm.name} seed {seed} ({arm.parameters:,} parameters, {max_steps} steps)")
                overrides = [
                    f"data.path={study.data}",
                    f"out_dir={run_dir}",
                    f"train.max_steps={max_steps}",
                    f"train.seed={seed}",
                    *study.recipe_overrides,
                ]
                recipe = load_recipe(study.recipe, overrides)
                recipe.model.overrides = arm.config.to_dict()
                init = None
                if arm.init_from:
                    source = finals[(arm.init_from, seed)]
                    init = run_dir.parent / f"seed-{seed}-init"
                    if not init.is_dir():
                        share_checkpoint(source, arm.share_strategy or "mean", init)
                run_pretrain(recipe, resume="auto", init_from=str(init) if init else None, say=say)
                final = _final_checkpoint(run_dir, max_steps)
                if final is None:
                    raise MobiLlamaError(f"{run_dir}: the run ended without a final checkpoint")
            finals[(arm.name, seed)] = final
    results = evaluate_runs(study, arms, finals, say)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(format_study(results), encoding="utf-8")
    plot_study(study, arms, results, out)
    say(f"\nstudy report: {out / 'report.md'}")
    return results


def _run_speed(run_dir: Path) -> float | None:
    speeds = [r["tokens_per_s"] for r in read_metrics(run_dir) if r.get("tokens_per_s")]
    return sorted(speeds)[len(speeds) // 2] if speeds else None


def evaluate_run(study: StudyConfig, ckpt: Path) -> dict[str, Any]:
    """Validation loss and quick-benchmark item scores of one final checkpoint, cached beside the run.

    The cache (``RUN/study-eval.json``) is keyed by the checkpoint and the evaluation settings, so
    re-running a finished study re-reads it instead of evaluating again.
    """
    cache = ckpt.parent.parent / "study-eval.json"
    key = {
        "checkpoint": str(ckpt.resolve()),
        "eval_samples": study.eval_samples,
        "bench_limit": study.bench_limit,
        "bench_data": study.bench_data,
    }
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            saved = None  # a damaged cache is recomputed, never trusted
        if isinstance(saved, dict) and saved.get("key") == key:
            return saved
    ppl = evaluate_perplexity(ckpt, study.data, split="val", limit=study.eval_samples)
    result = {"key": key, "val_loss": ppl["loss"], "bench": quick_benchmark_items(study, ckpt)}
    write_json(cache, result)
    return result


def quick_benchmark_items(study: StudyConfig, ckpt: Path) -> dict[str, Any]:
    """Per-item scores of the quick suite (the same first ``bench_limit`` items of each task for every run)."""
    if study.bench_limit == 0:
        return {"status": "skipped", "reason": "bench_limit is 0"}
    data_dir = Path(study.bench_data) if study.bench_data else DEFAULT_DATA_DIR
    if not data_dir.is_dir():
        return {
            "status": "not available",
            "reason": f"benchmark data not found at {data_dir} (run 'mobillama eval fetch-data')",
        }
    if not (ckpt / "tokenizer.json").is_file() and not (ckpt / "tokenizer.model").is_file():
        return {"status": "not available", "reason": f"{ckpt} has no tokenizer"}
    report = run_suite(ckpt, get_suite("quick"), data_dir=data_dir, limit=study.bench_limit, seed=1234)
    tasks = {name: t["samples"] for name, t in report["tasks"].items() if t["status"] == "ok"}
    if not tasks:
        reasons = "; ".join(f"{n}: {t.get('reason', t['status'])}" for n, t in report["tasks"].items())
        return {"status": "not available", "reason": reasons}
    return {"status": "ok", "tasks": tasks}


def aggregate_benchmarks(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's quick-benchmark result: item scores averaged over seeds, with bootstrap intervals.

    Every seed scores the same items, so averaging per item removes seed noise before resampling items;
    the interval then measures how much the benchmark's finite item sample could move the number.
    """
    not_ok = [b for b in per_seed if b.get("status") != "ok"]
    if not_ok or not per_seed:
        reason = not_ok[0].get("reason", "no runs") if not_ok else "no runs"
        return {"status": not_ok[0]["status"] if not_ok else "not available", "reason": reason}
    tasks = sorted(set.intersection(*(set(b["tasks"]) for b in per_seed)))
    items: dict[str, list[float]] = {}
    for task in tasks:
        ids = per_seed[0]["tasks"][task]["ids"]
        if any(b["tasks"][task]["ids"] != ids for b in per_seed):
            raise MobiLlamaError(f"quick benchmark {task}: the runs scored different items; cannot pair them")
        columns = [b["tasks"][task]["scores"] for b in per_seed]
        items[task] = [sum(col) / len(col) for col in zip(*columns)]
    return {
        "status": "ok",
        "tasks": {t: stats.bootstrap_ci(items[t]) for t in tasks},
        "average": stats.bootstrap_task_average(items),
        "items": items,
    }


def _rss_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise MobiLlamaError(f"/proc/self/status has no {field} line")


def _training_memory_child(config: dict, micro_batch: int, seq_len: int) -> dict[str, float]:
    """Run in a fresh process: peak RSS of three fp32 AdamW steps of a model (see measure_training_memory).

    The peak is counted from the moment training starts, not from process start: importing torch and
    transformers can briefly use more memory than training a small model, and would hide it. Linux
    resets the high-water mark on writing 5 to ``/proc/self/clear_refs``; where that is not allowed,
    a thread samples the resident size every millisecond instead (it can miss a very short spike).
    """
    idle = _rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        sampled = None
    except OSError:
        sampled = {"peak": idle, "stop": False}

        def sample() -> None:
            while not sampled["stop"]:
                sampled["peak"] = max(sampled["peak"], _rss_kib("VmRSS"))
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    torch.manual_seed(0)
    model = MobiLlama(ModelConfig.from_dict(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, model.config.vocab_size, (micro_batch, seq_len))
    for _ in range(3):
        loss = causal_lm_loss(model(tokens), tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if sampled is None:
        peak = _rss_kib("VmHWM")
    else:
        sampled["stop"] = True
        sampler.join()
        peak = max(sampled["peak"], _rss_kib("VmRSS"))
    return {"peak_rss_mb": peak / 1024, "above_idle_mb": max(peak - idle, 0) / 1024}


def measure_training_memory(config: ModelConfig, micro_batch: int, seq_len: int) -> dict[str, float]:
    """Peak resident memory of training ``config`` (fp32 weights, grads, AdamW state, activations).

    Measured in a fresh interpreter because a process's peak RSS never goes down: measured inside the
    study process, every arm would report the largest arm's peak.
    """
    code = (
        "import json, sys; from mobillama.study.runner import _training_memory_child as f; "
        "print(json.dumps(f(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))"
    )
    args = [sys.executable, "-c", code, json.dumps(config.to_dict()), str(micro_batch), str(seq_len)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise MobiLlamaError(
            f"memory measurement of {config.num_hidden_layers}L/{config.hidden_size}h failed: {tail}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def evaluate_runs(study: StudyConfig, arms: list[Arm], finals: dict, say) -> dict[str, Any]:
    micro_batch = load_recipe(study.recipe, study.recipe_overrides).batch.micro_batch_size
    seq_len = int(load_manifest(study.data)["seq_len"])
    per_arm: dict[str, Any] = {}
    for arm in arms:
        say(f"evaluating {arm.name} ({len(study.seeds)} runs)")
        runs = []
        for seed in study.seeds:
            ckpt = finals[(arm.name, seed)]
            result = evaluate_run(study, ckpt)
            runs.append(
                {
                    "seed": seed,
                    "checkpoint": str(ckpt),
                    "val_loss": result["val_loss"],
                    "tokens_per_s": _run_speed(ckpt.parent.parent),
                    "bench": result["bench"],
                }
            )
        losses = [r["val_loss"] for r in runs]
        mean, low, high = mean_ci(losses)
        per_arm[arm.name] = {
            "question": arm.question,
            "parameters": arm.parameters,
            "config": arm.config.to_dict(),
            "runs": [{k: v for k, v in r.items() if k != "bench"} for r in runs],
            "val_loss": {"mean": mean, "low": low, "high": high},
            "bench": aggregate_benchmarks([r["bench"] for r in runs]),
            "memory": measure_training_memory(arm.config, micro_batch, seq_len),
        }
    comparisons: dict[str, Any] = {}
    bench_comparisons: dict[str, Any] = {}
    if "shared" in per_arm and len(study.seeds) >= 2:
        shared = [r["val_loss"] for r in per_arm["shared"]["runs"]]
        for name, arm in per_arm.items():
            if name != "shared":
                comparisons[f"shared - {name}"] = paired_difference(
                    shared, [r["val_loss"] for r in arm["runs"]]
                )
    if per_arm.get("shared", {}).get("bench", {}).get("status") == "ok":
        shared_items = per_arm["shared"]["bench"]["items"]
        for name, arm in per_arm.items():
            if name != "shared" and arm["bench"]["status"] == "ok":
                # paired_bootstrap reports B - A: A = the arm, B = shared, so positive favours shared
                test = stats.paired_bootstrap(arm["bench"]["items"], shared_items)
                bench_comparisons[f"shared - {name}"] = test["average"]
    return {
        "study": study.name,
        "seeds": study.seeds,
        "tokens_per_run": study.tokens_per_run,
        "arms": per_arm,
        "comparisons": comparisons,
        "bench_comparisons": bench_comparisons,
    }


def _pct_interval(result: dict[str, Any]) -> str:
    return f"{100 * result['mean']:.1f} [{100 * result['ci_low']:.1f}, {100 * result['ci_high']:.1f}]"


def format_study(results: dict[str, Any]) -> str:
    lines = [
        f"# Study {results['study']}",
        "",
        f"{len(results['seeds'])} seeds per arm, {results['tokens_per_run']:,} training tokens per run. "
        "Validation loss in nats/token (lower is better), mean with a 95% t-interval across seeds. "
        "Quick benchmarks: accuracy (%) averaged over PIQA, ARC-Challenge and Winogrande (0-shot), item "
        "scores averaged over seeds, 95% bootstrap interval over items. Memory: peak RSS of three training "
        "steps at the study's micro-batch, in a fresh process (MB).",
        "",
        "| arm | question | parameters | val loss | 95% CI | perplexity | quick avg acc [95% CI] | "
        "tokens/s | train peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in results["arms"].items():
        v = arm["val_loss"]
        speeds = [r["tokens_per_s"] for r in arm["runs"] if r["tokens_per_s"]]
        speed = f"{sum(speeds) / len(speeds):,.0f}" if speeds else "n/a"
        bench = arm.get("bench", {})
        acc = _pct_interval(bench["average"]) if bench.get("status") == "ok" else bench.get("status", "n/a")
        memory = arm.get("memory")
        rss = f"{memory['peak_rss_mb']:,.0f} MB" if memory else "n/a"
        lines.append(
            f"| {name} | {arm['question']} | {arm['parameters']:,} | {v['mean']:.4f} | "
            f"[{v['low']:.4f}, {v['high']:.4f}] | {2.718281828 ** v['mean']:.2f} | {acc} | {speed} | {rss} |"
        )
    if results["comparisons"]:
        lines += [
            "",
            "Seed-paired differences in validation loss (shared minus arm; negative favours the shared model):",
            "",
            "| comparison | mean | 95% CI | p (paired t) |",
            "|---|---|---|---|",
        ]
        for name, c in results["comparisons"].items():
            lines.append(
                f"| {name} | {c['mean']:+.4f} | [{c['low']:+.4f}, {c['high']:+.4f}] | {c['p_value']:.3g} |"
            )
    if results.get("bench_comparisons"):
        lines += [
            "",
            "Item-paired bootstrap of the quick-benchmark average (shared minus arm, accuracy points; "
            "positive favours the shared model):",
            "",
            "| comparison | difference | 95% CI | p (bootstrap) |",
            "|---|---|---|---|",
        ]
        for name, c in results["bench_comparisons"].items():
            lines.append(
                f"| {name} | {100 * c['diff']:+.2f} | [{100 * c['ci_low']:+.2f}, {100 * c['ci_high']:+.2f}] "
                f"| {c['p_value']:.3g} |"
            )
    statuses = {a.get("bench", {}).get("reason") for a in results["arms"].values()} - {None}
    if statuses:
        lines += ["", "Quick benchmarks not run: " + "; ".join(sorted(statuses))]
    return "\n".join(lines) + "\n"


def plot_study(study: StudyConfig, arms: list[Arm], results: dict[str, Any], out: Path) -> None:
    """Loss against tokens (first seed of each arm) and final loss against parameters."""
    # matplotlib (~1.3 s) only for the plots; the Agg backend must be chosen before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = study.seeds[0]
    plot_runs(
        [out / a.name / f"seed-{seed}" for a in arms],
        out / "loss_vs_tokens.png",
        labels=[f"{a.name} (seed {seed})" for a in arms],
    )
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, arm in results["arms"].items():
        v = arm["val_loss"]
        ax.errorbar(
            arm["parameters"],
            v["mean"],
            yerr=[[v["mean"] - v["low"]], [v["high"] - v["mean"]]],
            fmt="o",
            capsize=4,
            label=name,
        )
    ax.set_xlabel("parameters (unique)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_parameters.png", dpi=120)
    plt.close(fig)
