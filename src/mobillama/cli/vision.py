"""Vision commands: ``mobillama vision build-data | pretrain-encoder | init | train | chat`` (MobiLlama-V)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "vision",
        help="MobiLlama-V: build demo data, create, train and query the vision-language model",
        description="MobiLlama-V: a CLIP/SigLIP vision encoder bridged into a MobiLlama decoder by a projector.",
    )
    sub = p.add_subparsers(dest="vision_command", metavar="SUBCOMMAND", required=True)

    b = sub.add_parser(
        "build-data",
        help="build the offline caption and instruction sets from Tux Paint stamps and skimage photos",
        description="Write captions-train/val.jsonl, instruct.json and images/ from the Debian "
        "tuxpaint-stamps-default stamps (one-line captions) and scikit-image's photos. Nothing is downloaded.",
    )
    b.add_argument("--out", required=True, help="output directory (must not exist)")
    b.add_argument("--stamps", default="/usr/share/tuxpaint/stamps", help="Tux Paint stamps directory")
    b.add_argument("--max-side", type=int, default=128, help="shrink every image to at most this many pixels")
    b.add_argument("--val-every", type=int, default=10, help="hold out every N-th stamp as validation")
    b.add_argument(
        "--views-every",
        type=int,
        default=5,
        help="also write a new view (shrunk, moved) of every N-th training stamp to captions-views.jsonl",
    )
    b.add_argument("--limit", type=int, default=None, help="use only the first N stamps (quick runs)")
    b.set_defaults(func=run_build_data)

    e = sub.add_parser(
        "pretrain-encoder",
        help="contrastively pre-train a small CLIP encoder on caption pairs (no CLIP installs offline)",
        description="Train transformers' CLIPModel (its contrastive loss; a byte-level text tower) on a caption "
        "JSONL with the project's training loop. OUT/final is a CLIP checkpoint directory for "
        "'vision init --encoder OUT/final'; OUT/final/encoder_pretrain.json records the settings, the data's "
        "hash and the image->caption retrieval accuracy on the data and on each --eval file.",
    )
    e.add_argument("--data", required=True, help="caption JSONL ({'image': path, 'caption': text} per line)")
    e.add_argument("--out", required=True, help="run directory (OUT/final must not exist)")
    e.add_argument(
        "--encoder-config",
        default="small-64",
        choices=["tiny", "small-64", "clip-l-336"],
        help="vision tower shape",
    )
    e.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    e.add_argument("--batch-size", type=int, default=64, help="pairs per step (the negatives of each pair)")
    e.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine to lr/10)")
    e.add_argument("--warmup", type=int, default=50, help="warmup steps")
    e.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="train on the images as they are (default: a random shrink and position per image and step)",
    )
    e.add_argument(
        "--eval", action="append", default=[], metavar="JSONL", help="also report retrieval on this set"
    )
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device")
    e.add_argument("--seed", type=int, default=0, help="seed")
    e.add_argument(
        "--checkpoint-every", type=int, default=None, help="write OUT/checkpoints/step-N every N steps"
    )
    e.add_argument(
        "--resume", default=None, help="'auto' (newest valid step checkpoint in OUT) or a step checkpoint"
    )
    e.set_defaults(func=run_pretrain_encoder)

    i = sub.add_parser(
        "init",
        help="build an untrained MobiLlama-V from a decoder checkpoint and an encoder",
        description="Combine a decoder checkpoint, a vision encoder (pretrained from a local directory, or a "
        "randomly initialised shape) and a fresh projector into one MobiLlama-V checkpoint directory.",
    )
    i.add_argument("--decoder", required=True, help="decoder checkpoint directory or preset name")
    enc = i.add_mutually_exclusive_group()
    enc.add_argument("--encoder", help="local directory of a CLIP or SigLIP checkpoint (no hub downloads)")
    enc.add_argument(
        "--encoder-config",
        default="clip-l-336",
        choices=["tiny", "small-64", "clip-l-336"],
        help="random encoder of this shape when --encoder is not given (clip-l-336: LLaVA-1.5's ViT-L/14 @336)",
    )
    i.add_argument(
        "--projector", default="mlp2x_gelu", choices=["mlp2x_gelu", "linear"], help="projector type"
    )
    i.add_argument(
        "--feature-layer", type=int, default=-2, help="encoder hidden state to use (-2 = penultimate)"
    )
    i.add_argument("--tokenizer", help="tokenizer directory to copy in (default: the decoder's, if any)")
    i.add_argument("--seed", type=int, default=0, help="seed for the random initialisation")
    i.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    i.set_defaults(func=run_init)

    t = sub.add_parser(
        "train",
        help="stage 1 (projector on captions) or stage 2 (projector + decoder on conversations)",
        description="Train one MobiLlama-V stage with the project's training loop. Stage 1 trains only the "
        "projector on caption pairs (JSONL); stage 2 trains the projector and the decoder on LLaVA-format "
        "conversations with assistant-only loss. The result is OUT/final.",
    )
    t.add_argument("checkpoint", help="MobiLlama-V checkpoint directory (from 'vision init' or stage 1)")
    t.add_argument("--stage", type=int, required=True, choices=[1, 2], help="which stage to train")
    t.add_argument("--data", required=True, help="caption JSONL (stage 1) or LLaVA JSON/JSONL (stage 2)")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine to lr/10)")
    t.add_argument("--warmup", type=int, default=10, help="warmup steps")
    t.add_argument("--batch-size", type=int, default=4, help="samples per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--max-length", type=int, default=512, help="max tokens per sample (text tokens)")
    t.add_argument(
        "--val-fraction", type=float, default=0.1, help="fraction of samples held out for validation"
    )
    t.add_argument("--train-encoder", action="store_true", help="stage 2: also train the vision encoder")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device")
    t.add_argument("--seed", type=int, default=0, help="seed")
    t.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="write OUT/checkpoints/step-N (a MobiLlama-V directory) every N steps (default: at the end)",
    )
    t.add_argument(
        "--resume", default=None, help="'auto' (newest valid step checkpoint in OUT) or a step checkpoint"
    )
    t.set_defaults(func=run_train)

    c = sub.add_parser(
        "chat",
        help="ask one question about one image",
        description="One-shot image question: the prompt is rendered with the tokenizer's chat template "
        "with the image placed before it, then answered greedily (or sampled with --temperature).",
    )
    c.add_argument("checkpoint", help="MobiLlama-V checkpoint directory")
    c.add_argument("--image", required=True, help="image file")
    c.add_argument("--prompt", default="Describe this picture.", help="the question")
    c.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--seed", type=int, default=None, help="sampling seed")
    c.set_defaults(func=run_chat)


def run_build_data(args: argparse.Namespace) -> int:
    from mobillama.vision.demo_data import build_demo_data

    manifest = build_demo_data(
        args.out,
        stamps_dir=args.stamps,
        max_side=args.max_side,
        val_every=args.val_every,
        views_every=args.views_every,
        limit=args.limit,
    )
    print(json.dumps(manifest, indent=2))
    return 0


def run_pretrain_encoder(args: argparse.Namespace) -> int:
    from mobillama.vision.encoder_pretrain import pretrain_encoder

    summary = pretrain_encoder(
        args.data,
        args.out,
        encoder_config=args.encoder_config,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup,
        augment=args.augment,
        eval_data=args.eval,
        seed=args.seed,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0


def run_init(args: argparse.Namespace) -> int:
    from mobillama.vision.model import init_vision_model

    path = init_vision_model(
        args.decoder,
        args.out,
        encoder_dir=args.encoder,
        encoder_config=args.encoder_config,
        projector=args.projector,
        feature_layer=args.feature_layer,
        tokenizer_dir=args.tokenizer,
        seed=args.seed,
    )
    print(f"wrote {path}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from mobillama.vision.train import run_stage

    summary = run_stage(
        args.checkpoint,
        args.stage,
        args.data,
        args.out,
        max_steps=args.steps,
        lr=args.lr,
        warmup_steps=args.warmup,
        micro_batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        val_fraction=args.val_fraction,
        seed=args.seed,
        train_encoder=args.train_encoder,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )
    print(json.dumps(summary, indent=2))
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from mobillama.vision.chat import answer_image_question

    print(
        answer_image_question(
            args.checkpoint,
            args.image,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
        )
    )
    return 0
