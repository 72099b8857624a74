"""Run the study: every arm x seed through the project's own pre-training, then aggregate.

A study is one YAML file (see ``studies/small.yaml``): the shared model's shape, the token budget per
run, the seeds, the prepared data and a base training recipe. Each run is an ordinary pre-training run
directory (``OUT/ARM/seed-N``) with its recipe, manifest link, checkpoints list and metrics, so every
number in the report traces back to a run the study wrote. A run whose final checkpoint exists is not
run again: the study can be stopped and continued run by run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mobillama.config import ModelConfig
from mobillama.errors import MobiLlamaError
from mobillama.study.arms import Arm, build_arms
from mobillama.study.report import mean_ci, paired_difference


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
    from mobillama.train.state import list_checkpoints

    done = [c for c in list_checkpoints(run_dir) if int(c.name.split("-")[-1]) >= max_steps]
    return done[-1] if done else None


def run_study(study: StudyConfig, say=print) -> dict[str, Any]:
    """Train every missing run, evaluate every run, write ``results.json`` and ``report.md``."""
    from mobillama.train.pretrain import run_pretrain
    from mobillama.train.recipe import load_recipe
    from mobillama.train.share import share_checkpoint

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
    from mobillama.train.metrics import read_metrics

    speeds = [r["tokens_per_s"] for r in read_metrics(run_dir) if r.get("tokens_per_s")]
    return sorted(speeds)[len(speeds) // 2] if speeds else None


def evaluate_runs(study: StudyConfig, arms: list[Arm], finals: dict, say) -> dict[str, Any]:
    from mobillama.eval.perplexity import evaluate_perplexity

    per_arm: dict[str, Any] = {}
    for arm in arms:
        runs = []
        for seed in study.seeds:
            ckpt = finals[(arm.name, seed)]
            ppl = evaluate_perplexity(ckpt, study.data, split="val", limit=study.eval_samples)
            runs.append(
                {
                    "seed": seed,
                    "checkpoint": str(ckpt),
                    "val_loss": ppl["loss"],
                    "tokens_per_s": _run_speed(ckpt.parent.parent),
                }
            )
        losses = [r["val_loss"] for r in runs]
        mean, low, high = mean_ci(losses)
        per_arm[arm.name] = {
            "question": arm.question,
            "parameters": arm.parameters,
            "config": arm.config.to_dict(),
            "runs": runs,
            "val_loss": {"mean": mean, "low": low, "high": high},
        }
    comparisons = {}
    if "shared" in per_arm and len(study.seeds) >= 2:
        shared = [r["val_loss"] for r in per_arm["shared"]["runs"]]
        for name, arm in per_arm.items():
            if name != "shared":
                comparisons[f"shared - {name}"] = paired_difference(
                    shared, [r["val_loss"] for r in arm["runs"]]
                )
    return {
        "study": study.name,
        "seeds": study.seeds,
        "tokens_per_run": study.tokens_per_run,
        "arms": per_arm,
        "comparisons": comparisons,
    }


def format_study(results: dict[str, Any]) -> str:
    lines = [
        f"# Study {results['study']}",
        "",
        f"{len(results['seeds'])} seeds per arm, {results['tokens_per_run']:,} training tokens per run. "
        "Validation loss in nats/token (lower is better), mean with a 95% t-interval across seeds.",
        "",
        "| arm | question | parameters | val loss | 95% CI | perplexity | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, arm in results["arms"].items():
        v = arm["val_loss"]
        speeds = [r["tokens_per_s"] for r in arm["runs"] if r["tokens_per_s"]]
        speed = f"{sum(speeds) / len(speeds):,.0f}" if speeds else "n/a"
        lines.append(
            f"| {name} | {arm['question']} | {arm['parameters']:,} | {v['mean']:.4f} | "
            f"[{v['low']:.4f}, {v['high']:.4f}] | {2.718281828 ** v['mean']:.2f} | {speed} |"
        )
    if results["comparisons"]:
        lines += [
            "",
            "Seed-paired differences (shared minus arm; negative favours the shared model):",
            "",
            "| comparison | mean | 95% CI | p (paired t) |",
            "|---|---|---|---|",
        ]
        for name, c in results["comparisons"].items():
            lines.append(
                f"| {name} | {c['mean']:+.4f} | [{c['low']:+.4f}, {c['high']:+.4f}] | {c['p_value']:.3g} |"
            )
    return "\n".join(lines) + "\n"


def plot_study(study: StudyConfig, arms: list[Arm], results: dict[str, Any], out: Path) -> None:
    """Loss against tokens (first seed of each arm) and final loss against parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mobillama.train.metrics import plot_runs

    plot_runs([out / a.name / f"seed-{study.seeds[0]}" for a in arms], out / "loss_vs_tokens.png")
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
