"""Core commands: ``info`` (parameter accounting)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="parameter counts and memory of a preset, config file or checkpoint",
        description="Show total and per-part parameter counts (embeddings, attention, FFN, norms, head), "
        "bytes at fp32/bf16/int8/int4, and the saving from sharing the FFN. Nothing is allocated: the "
        "model is built on PyTorch's meta device.",
    )
    p.add_argument(
        "model",
        metavar="PRESET_OR_CHECKPOINT",
        help="a preset name (e.g. mobillama-0.5b), a YAML/JSON config file, or a checkpoint directory",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    from mobillama.config import resolve_config
    from mobillama.info import format_report, parameter_report

    report = parameter_report(resolve_config(args.model))
    print(json.dumps(report, indent=2) if args.json else format_report(report, args.model))
    return 0
