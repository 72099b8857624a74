"""Pretrained Llama -> MobiLlama, measured: merge SmolLM2-135M-Instruct's FFNs, heal by distillation, score.

For each sharing degree (``--sharing``; default group:2, group:3, group:5, group:10, all and the non-uniform
dedicated:2+group:2) four arms are scored:

- ``mean``      the group's FFNs averaged element-wise (``mobillama share --strategy mean``),
- ``aligned``   weight-matched, activation-weighted merge (``--strategy aligned --weighting activation``),
- ``healed``    ``aligned`` continued with ``pretrain --distill-from SOURCE --train-only ffn`` for the
                fixed token budget of ``studies/heal_real.yaml``, once per seed (``--seeds``),

plus two references: the model as imported (``source``) and the **control**: the unshared model healed with
the same recipe, budget, data and seeds, which tells what the healing data alone does to the scores.

Every arm gets perplexity on ``reference_text()`` (llama.cpp's method: 512-token windows, second half
scored; per-window losses kept so arms can be paired) and the quick benchmark suite (PIQA, ARC-Challenge,
WinoGrande, 0-shot, the same first ``--limit`` items of each) with bootstrap intervals. Paired tests:
aligned vs mean (per window and per item), healed vs aligned, healed vs control. Results are cached per
checkpoint under ``--out`` (an interrupted study resumes); ``--report`` prints the markdown tables and
writes ``results.json``.

    mobillama data prepare --input ~/.cache/mobillama/english/{shakespeare,kjv,linux-doc} \\
        --tokenizer ~/.cache/mobillama/models/smollm2-135m-instruct/checkpoint --seq-len 256 \\
        --val-fraction 0.02 --out runs/heal-data
    PYTHONPATH=src python studies/heal_real.py --data runs/heal-data --out runs/heal-study
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mobillama.checkpoint import load_checkpoint, load_model
from mobillama.cli import main as cli
from mobillama.convert.fetch import cached_real_model
from mobillama.eval import stats
from mobillama.eval.perplexity import reference_text, windowed_perplexity
from mobillama.eval.suites import get_suite, run_suite
from mobillama.study.report import mean_ci, paired_difference
from mobillama.study.runner import aggregate_benchmarks
from mobillama.tokenizer import load_tokenizer
from mobillama.train import share

RECIPE = Path(__file__).with_name("heal_real.yaml")
SHARING = ["group:2", "group:3", "group:5", "group:10", "all", "dedicated:2+group:2"]
MERGES = {"mean": ("mean", {}), "aligned": ("aligned", {"weighting": "activation"})}


def score(ckpt: Path, ids: list[int], windows: int, limit: int, cache: Path) -> dict[str, Any]:
    """Per-window losses on the reference text and per-item quick-suite scores of one checkpoint (cached)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    t0 = time.perf_counter()
    model = load_model(ckpt, dtype=torch.float32).eval()
    losses = [
        windowed_perplexity(model, ids[w * 512 : (w + 1) * 512])["loss"] for w in range(windows)
    ]  # equal scored tokens per window: exp(mean of window losses) is the usual windowed perplexity
    del model
    report = run_suite(ckpt, get_suite("quick"), limit=limit, seed=1234)
    bench = {name: t["samples"] for name, t in report["tasks"].items() if t["status"] == "ok"}
    result = {
        "checkpoint": str(ckpt),
        "window_losses": losses,
        "perplexity": math.exp(sum(losses) / len(losses)),
        "bench": {"status": "ok", "tasks": bench} if bench else {"status": "not available"},
        "seconds": time.perf_counter() - t0,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result) + "\n")
    return result


def merge(source: Path, sharing: str, label: str, out: Path) -> Path:
    strategy, options = MERGES[label]
    target = out / "merged" / f"{sharing.replace(':', '-').replace('+', '_')}-{label}"
    if not (target / "model.safetensors").is_file():
        share.share_checkpoint(source, strategy, target, sharing, **options)
    return target


def heal(start: Path, source: Path, name: str, seed: int, data: Path, steps: int, out: Path) -> Path:
    run = out / "healed" / f"{name}-seed{seed}"
    final = run / "checkpoints" / f"step-{steps:08d}"
    if not (final / "model.safetensors").is_file():
        args = [
            "pretrain", "--recipe", str(RECIPE), "--init-from", str(start), "--distill-from", str(source),
            "--train-only", "ffn", "--out", str(run), "--resume", "auto", f"--data.path={data}",
            f"--train.seed={seed}", f"--data.seed={seed}", f"--train.max_steps={steps}",
            f"--checkpoint.every_steps={steps}",
        ]  # fmt: skip
        if cli(args) != 0:
            raise SystemExit(f"healing run {run} failed")
    return final


def arm_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm over its seeds (one result for unhealed arms): perplexity geometric mean and t-interval over
    seeds,
    per-window losses averaged over seeds, quick-suite items averaged over seeds with bootstrap intervals."""
    ppl = [r["perplexity"] for r in results]
    mean, low, high = (
        math.exp(v) for v in mean_ci([math.log(p) for p in ppl])
    )  # geometric: ppl spans decades
    windows = [sum(col) / len(col) for col in zip(*(r["window_losses"] for r in results))]
    return {
        "seeds": len(results),
        "perplexity": {"mean": mean, "low": low, "high": high, "per_seed": ppl},
        "window_losses": windows,
        "bench": aggregate_benchmarks([r["bench"] for r in results]),
    }


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Paired B vs A: window-paired loss difference (t-test over windows; exp gives the perplexity ratio)
    and item-paired bootstrap of the quick-suite average (accuracy points, B - A)."""
    windows = paired_difference(b["window_losses"], a["window_losses"])
    out: dict[str, Any] = {"ppl_ratio": math.exp(windows["mean"]), "windows": windows}
    if a["bench"].get("status") == "ok" and b["bench"].get("status") == "ok":
        out["bench"] = stats.paired_bootstrap(a["bench"]["items"], b["bench"]["items"])["average"]
    return out


def fmt_ppl(p: dict[str, Any]) -> str:
    if p["low"] == p["high"]:
        return f"{p['mean']:.4g}"
    return f"{p['mean']:.4g} [{p['low']:.4g}, {p['high']:.4g}]"


def fmt_bench(b: dict[str, Any]) -> str:
    if b.get("status") != "ok":
        return "n/a"
    avg = b["average"]
    return f"{100 * avg['mean']:.1f} [{100 * avg['ci_low']:.1f}, {100 * avg['ci_high']:.1f}]"


def report(arms: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    comparisons = {}
    for sharing in args.sharing:
        pairs = [("mean", "aligned"), ("aligned", "healed")]
        for a, b in pairs + [("control", "healed")]:
            ka = a if a == "control" else f"{sharing} {a}"
            kb = f"{sharing} {b}"
            if ka in arms and kb in arms:
                comparisons[f"{kb} vs {ka}"] = compare(arms[ka], arms[kb])
    print(
        f"\nSmolLM2-135M-Instruct: perplexity on reference_text(), {args.windows} windows of 512 (second half "
        f"scored); quick suite = PIQA, ARC-C (acc_norm), WinoGrande, 0-shot, first {args.limit} items each, "
        f"average accuracy % [95% bootstrap CI]; healed: {args.steps} steps x 1,024 tokens, seeds {args.seeds} "
        "(perplexity: geometric mean [t-interval of log perplexity over seeds])\n"
    )
    print("| arm | FFNs | perplexity | quick avg % |")
    print("|---|---|---|---|")
    for name, arm in arms.items():
        print(f"| {name} | {arm['ffns']} | {fmt_ppl(arm['perplexity'])} | {fmt_bench(arm['bench'])} |")
    print(
        "\n| comparison (B vs A) | perplexity B/A [95% CI], p (window-paired t) | quick avg B-A points [95% CI], p |"
    )
    print("|---|---|---|")
    for name, c in comparisons.items():
        w = c["windows"]
        ratio = f"{c['ppl_ratio']:.3g} [{math.exp(w['low']):.3g}, {math.exp(w['high']):.3g}], p={w['p_value']:.2g}"
        b = c.get("bench")
        bench = (
            f"{100 * b['diff']:+.1f} [{100 * b['ci_low']:+.1f}, {100 * b['ci_high']:+.1f}], p={b['p_value']:.2g}"
            if b
            else "n/a"
        )
        print(f"| {name} | {ratio} | {bench} |")
    return {"arms": arms, "comparisons": comparisons}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="healing shards (mobillama data prepare)")
    parser.add_argument("--out", required=True, type=Path, help="study directory (resumable)")
    parser.add_argument("--sharing", nargs="+", default=SHARING, help=f"sharing degrees (default {SHARING})")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="healing seeds (default 0 1 2)"
    )
    parser.add_argument("--steps", type=int, default=30, help="healing steps of 1,024 tokens (default 30)")
    parser.add_argument("--windows", type=int, default=16, help="512-token windows scored (default 16)")
    parser.add_argument("--limit", type=int, default=100, help="quick-suite items per task (default 100)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only print the tables of what is cached")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = cached_real_model("smollm2-135m-instruct")[1]  # fetched into the cache on first use
    ids = load_tokenizer(source).encode(reference_text(6000 * args.windows), parse_special=False)
    if len(ids) < 512 * args.windows:
        print(f"reference_text gives {len(ids)} tokens, fewer than {args.windows} windows", file=sys.stderr)
        return 2
    cache = args.out / "scores"

    def scored(ckpt: Path, key: str) -> dict[str, Any] | None:
        path = cache / f"{key}.json"
        if args.report:
            return json.loads(path.read_text()) if path.is_file() else None
        print(f"== {key}", file=sys.stderr, flush=True)
        return score(ckpt, ids, args.windows, args.limit, path)

    def key(*parts: Any) -> str:
        return "-".join(str(p).replace(":", "-").replace("+", "_") for p in parts)

    # seed 0 of everything first, so that an interrupted study has every arm once
    results: dict[str, list[dict[str, Any]]] = {}
    plan: list[tuple[str, Any]] = [("source", None)]
    plan += [(s, None) for s in args.sharing] + [("control", args.seeds[0])]
    plan += [(s, seed) for seed in args.seeds[1:] for s in args.sharing] + [
        ("control", seed) for seed in args.seeds[1:]
    ]
    for sharing, seed in plan:
        if sharing == "source":
            results.setdefault("source", []).append(scored(source, "source"))
        elif sharing == "control":
            ckpt = (
                None
                if args.report
                else heal(source, source, "control", seed, args.data, args.steps, args.out)
            )
            results.setdefault("control", []).append(scored(ckpt, key("control", seed)))
        else:
            if seed is None:
                for label in MERGES:
                    ckpt = None if args.report else merge(source, sharing, label, args.out)
                    results.setdefault(f"{sharing} {label}", []).append(scored(ckpt, key(sharing, label)))
                seed = args.seeds[0]
            start = None if args.report else merge(source, sharing, "aligned", args.out)
            ckpt = (
                None
                if args.report
                else heal(start, source, key(sharing), seed, args.data, args.steps, args.out)
            )
            results.setdefault(f"{sharing} healed", []).append(scored(ckpt, key(sharing, "healed", seed)))
    arms = {}
    source_config, _ = load_checkpoint(source)
    for name, runs in results.items():
        runs = [r for r in runs if r is not None]
        if runs:
            sharing = name.split(" ")[0]
            ffns = (
                source_config.num_hidden_layers
                if sharing in ("source", "control")
                else source_config.replace(ffn_sharing=sharing).num_ffns
            )
            arms[name] = {"ffns": ffns, **arm_summary(runs)}
    summary = report(arms, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
