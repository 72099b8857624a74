"""Training commands: ``pretrain`` (one loop, any scale), ``share`` (large base -> shared FFN), ``plot``."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="pre-train a model from a recipe on token shards (CPU, DDP or FSDP2 via torchrun)",
        description="Train the model a recipe describes on the shards of 'mobillama data prepare', writing a run "
        "directory with metrics, TensorBoard events and resumable checkpoints. Override any recipe key with "
        "--section.key=value (e.g. --train.max_steps=200 --optim.lr=1e-3). For several processes launch "
        "with 'torchrun --nproc-per-node N -m mobillama pretrain ...'. See docs/training.md.",
    )
    p.add_argument(
        "--recipe",
        required=True,
        metavar="NAME_OR_YAML",
        help="a shipped recipe (tiny-cpu, mobillama-0.5b, mobillama-0.8b, large-base-1.2b, baseline1-0.5b, "
        "baseline2-0.5b) or a recipe YAML file",
    )
    p.add_argument(
        "--resume",
        metavar="auto|CKPT",
        default=None,
        help="'auto': continue from the newest valid checkpoint of the run directory (start fresh if none); "
        "or a checkpoint directory to continue from",
    )
    p.add_argument(
        "--init-from",
        metavar="CKPT",
        default=None,
        help="initialise the weights from this checkpoint directory (e.g. the output of 'mobillama share'); "
        "the optimizer starts fresh",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="run directory (default: the recipe's out_dir or runs/NAME)",
    )
    p.add_argument(
        "--distill-from",
        metavar="CKPT",
        default=None,
        help="distil from this teacher checkpoint (same vocabulary), e.g. the source of 'mobillama share': "
        "loss = alpha*T^2*KL + (1-alpha)*CE, set with --distill.alpha=A --distill.temperature=T "
        "(defaults 0.5, 1.0); see docs/sharing.md",
    )
    p.add_argument(
        "--train-only",
        choices=("all", "ffn"),
        default=None,
        help="'ffn': train only the FFNs, attention/norms/embeddings frozen (recipe key model.train_only)",
    )
    p.set_defaults(func=run_pretrain_cmd, accepts_overrides=True)

    s = subparsers.add_parser(
        "share",
        help="build a shared-FFN model from a dedicated-FFN checkpoint (the paper's 'large base' start)",
        description="Copy attention, norms, embeddings and head of a dedicated-FFN checkpoint (ffn_sharing none, "
        "e.g. a large-base-1.2b run) and collapse its per-layer FFNs into one shared FFN (or one per group). "
        "Continue training the result with 'mobillama pretrain --init-from OUT'.",
    )
    s.add_argument(
        "--from", dest="source", required=True, metavar="CKPT", help="dedicated-FFN checkpoint directory"
    )
    s.add_argument(
        "--strategy",
        required=True,
        metavar="aligned|aligned:K|aligned:auto|mean|layer:K",
        help="'aligned' permutes each FFN's hidden units onto the group's middle layer (aligned:K: its K-th) "
        "and averages; 'aligned:auto' picks each group's reference by loss on a calibration text; 'layer:K' "
        "takes the FFN of layer K (0-based) of each group, K below the smallest group's size; 'mean' averages "
        "unaligned (baseline). See docs/sharing.md",
    )
    s.add_argument(
        "--iters",
        type=int,
        default=None,
        metavar="N",
        help="aligned: rounds of re-aligning every FFN to the running average (default 3)",
    )
    s.add_argument(
        "--match",
        choices=("weights", "activations"),
        default="weights",
        help="aligned: pair hidden units by their weights (default) or by their activations' correlation on "
        "the calibration text",
    )
    s.add_argument(
        "--weighting",
        choices=("uniform", "activation"),
        default="uniform",
        help="aligned: average uniformly (default) or weight each unit by its importance in its own layer "
        "(RMS activation on the calibration text x down-column norm)",
    )
    s.add_argument(
        "--calibration",
        metavar="TEXT_FILE",
        default=None,
        help="calibration text for aligned:auto, --match activations, --weighting activation "
        "(default: built-in standard-library docstrings; the first 512 tokens are used)",
    )
    s.add_argument(
        "--sharing",
        default="all",
        metavar="SHARING",
        help="FFN sharing of the result: all, group:K (groups of K consecutive layers), or either after "
        "dedicated:N+ to keep the first N layers' own FFNs, e.g. dedicated:2+group:2 (default: all)",
    )
    s.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory (must not exist)")
    s.set_defaults(func=run_share_cmd)

    pl = subparsers.add_parser(
        "plot",
        help="plot train/validation loss against tokens for one or more runs into a PNG",
        description="Read RUN/metrics.jsonl of each run and draw training loss (solid) and validation loss "
        "(dashed) against tokens seen, one colour per run.",
    )
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    pl.add_argument("--out", required=True, metavar="PNG", help="output image path")
    pl.set_defaults(func=run_plot_cmd)


def run_pretrain_cmd(args: argparse.Namespace) -> int:
    from mobillama.train.pretrain import run_pretrain
    from mobillama.train.recipe import load_recipe

    overrides = list(getattr(args, "overrides", []))
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if args.distill_from:  # before the overrides, so --distill.alpha=... can refine the section
        overrides.insert(0, f"distill.teacher={json.dumps(str(args.distill_from))}")
    if args.train_only:
        overrides.append(f"model.train_only={args.train_only}")
    recipe = load_recipe(args.recipe, overrides)
    summary = run_pretrain(recipe, resume=args.resume, init_from=args.init_from)
    if not summary["is_main"]:
        return 0
    print(summary_line(summary))
    return 0


def summary_line(summary: dict, tokens: str = "tokens") -> str:
    """The one-line result of a training run (pretrain, sft)."""
    val = f", val_loss {summary['val_loss']:.4f}" if summary.get("val_loss") is not None else ""
    loss = f", loss {summary['loss']:.4f}" if summary.get("loss") is not None else ""
    return f"done: step {summary['step']}, {summary['tokens_seen']:,} {tokens}{loss}{val}; run dir {summary['run_dir']}"


def run_share_cmd(args: argparse.Namespace) -> int:
    from mobillama.train.share import DEFAULT_ITERS, share_checkpoint

    out = share_checkpoint(
        args.source,
        args.strategy,
        args.out,
        sharing=args.sharing,
        iters=DEFAULT_ITERS if args.iters is None else args.iters,
        match=args.match,
        weighting=args.weighting,
        calibration=args.calibration,
        say=print,
    )
    print(f"wrote {out} (strategy {args.strategy}, ffn_sharing {args.sharing})")
    return 0


def run_plot_cmd(args: argparse.Namespace) -> int:
    from mobillama.train.metrics import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out)}")
    return 0
