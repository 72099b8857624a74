"""Instruction tuning commands: ``sft`` (full or LoRA), ``sft build-data`` (the stdlib set), ``lora merge``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sft",
        help="instruction-tune a checkpoint on conversations (MobiLlama-Chat recipe; full or LoRA)",
        description="Fine-tune a base checkpoint on conversation files (ShareGPT, OpenAI messages or Alpaca JSONL) "
        "with the loss on assistant tokens only, through the same training loop as pre-training (checkpoints, "
        "resume, metrics). Override any recipe key with --section.key=value (e.g. --model.base=CKPT "
        "--train.epochs=1). 'mobillama sft build-data --out DIR' writes the offline stdlib instruction set. "
        "See docs/sft.md.",
    )
    p.add_argument(
        "--recipe",
        metavar="NAME_OR_YAML",
        default=None,
        help="a shipped SFT recipe (sft-mobillama-chat, sft-tiny-cpu) or an SFT recipe YAML file",
    )
    p.add_argument("--base", metavar="CKPT", default=None, help="checkpoint to fine-tune (sets model.base)")
    p.add_argument(
        "--resume",
        metavar="auto|CKPT",
        default=None,
        help="'auto': continue from the newest valid checkpoint of the run directory (start fresh if none); "
        "or a checkpoint directory to continue from",
    )
    p.add_argument(
        "--lora",
        metavar="SPEC",
        default=None,
        help="train LoRA adapters instead of all weights, e.g. "
        "r=16,alpha=32,dropout=0.05,targets=q_proj+v_proj+gate_proj+up_proj+down_proj ('' or 'default' for "
        "the recipe's/peft defaults); the shared FFN gets one adapter",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="run directory (default: the recipe's out_dir or runs/NAME)",
    )
    p.set_defaults(func=run_sft_cmd, accepts_overrides=True)
    sub = p.add_subparsers(dest="sft_command", metavar="SUBCOMMAND", required=False)
    b = sub.add_parser(
        "build-data",
        help="write the offline instruction set built from Python standard-library docstrings",
        description="Question/answer pairs about standard-library functions ('What does `json.dumps` do?' -> "
        "its signature and docstring summary), split by a stable hash of the function name into train.jsonl and "
        "heldout.jsonl (OpenAI messages format).",
    )
    b.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    b.set_defaults(func=run_build_data_cmd)

    lora = subparsers.add_parser(
        "lora",
        help="LoRA adapter utilities (merge an adapter into a plain checkpoint)",
        description="Utilities for LoRA adapters written by 'mobillama sft --lora'.",
    )
    lsub = lora.add_subparsers(dest="lora_command", metavar="SUBCOMMAND", required=True)
    m = lsub.add_parser(
        "merge",
        help="fold a LoRA adapter into its base weights and write a plain checkpoint",
        description="Load the base checkpoint, apply the adapter (peft), merge it into the weights and write a "
        "project checkpoint (config.json + model.safetensors + tokenizer with chat template) that needs no peft.",
    )
    m.add_argument("--base", required=True, metavar="CKPT", help="the checkpoint the adapter was trained on")
    m.add_argument(
        "--adapter", required=True, metavar="DIR", help="adapter directory (a LoRA run's checkpoints/step-N)"
    )
    m.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory (must not exist)")
    m.set_defaults(func=run_merge_cmd)


def run_sft_cmd(args: argparse.Namespace) -> int:
    from mobillama.cli.train import summary_line
    from mobillama.errors import MobiLlamaError
    from mobillama.sft.recipe import SFTRecipe, parse_lora_spec
    from mobillama.sft.train import run_sft
    from mobillama.train.recipe import load_recipe

    if not args.recipe:
        raise MobiLlamaError("mobillama sft needs --recipe NAME_OR_YAML (or the 'build-data' subcommand)")
    overrides = list(getattr(args, "overrides", []))
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if args.base:
        overrides.append(f"model.base={args.base}")
    if args.lora is not None:
        overrides += parse_lora_spec("" if args.lora == "default" else args.lora)
    recipe = load_recipe(args.recipe, overrides, cls=SFTRecipe)
    summary = run_sft(recipe, resume=args.resume)
    print(summary_line(summary, "target tokens"))
    return 0


def run_build_data_cmd(args: argparse.Namespace) -> int:
    from mobillama.sft.instructions import write_instruction_set

    counts = write_instruction_set(args.out)
    print(f"wrote {args.out}: {counts['train']} train, {counts['heldout']} held-out conversations")
    return 0


def run_merge_cmd(args: argparse.Namespace) -> int:
    from mobillama.sft.train import merge_lora

    print(f"wrote {merge_lora(args.base, args.adapter, args.out)}")
    return 0
