"""Does MobiLlama-V use the image? Held-out caption loss with images vs the same model without them.

Two runs of the project's training loop, identical in everything (model shape, init seed, data order,
steps, lr) except that the control sees all-zero images ("text-only"). Both train projector + decoder
(+ encoder with --train-encoder) on the offline caption set (``mobillama vision build-data``). The
encoder is random (``--encoder-config``) or a local CLIP directory (``--encoder``), for example one from
``mobillama vision pretrain-encoder`` on the same training captions. Reported on held-out images:

- vision model, real images           <- should be lowest
- vision model, images shuffled among the held-out samples (is it the *right* image that helps?)
- vision model, blank images
- text-only control                   <- the baseline

on two held-out sets: stamps never seen in training ("new stamps": needs generalisation to new objects)
and new views of training stamps ("new views": shrunk and moved, so only the image tells which of the
~700 seen captions is meant). With ``--seeds 0,1,2`` every seed trains both arms (paired: same init and
data order within a seed) and the table gives the mean, a 95% t-interval across seeds and the paired
difference real-images minus control with its p-value.

Usage: python benchmarks/vision_caption.py --data DIR --out runs/vision-bench [--steps 400] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch


def train_tokenizer(texts: list[str], out: Path, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    fast.save_pretrained(out)
    return fast


def held_out_losses(models: dict, examples: list, batch_size: int, device) -> dict[str, float]:
    """Caption loss of the vision model with the right, shuffled and blank images, and of the control."""
    from mobillama.vision.data import eval_batches
    from mobillama.vision.train import mean_loss

    def on_device(batches):
        for batch in batches:
            yield {k: v.to(device) for k, v in batch.items()}

    model, setup = models["vision"]
    images = [e.images for e in examples]
    random.Random(0).shuffle(images)
    shuffled = [type(e)(e.name, e.input_ids, e.labels, im) for e, im in zip(examples, images)]
    control, control_setup = models["text-only"]
    return {
        "vision, real images": mean_loss(
            model, on_device(eval_batches(examples, setup.processor, setup.pad_id, batch_size))
        ),
        "vision, shuffled images": mean_loss(
            model, on_device(eval_batches(shuffled, setup.processor, setup.pad_id, batch_size))
        ),
        "vision, blank images": mean_loss(
            model,
            on_device(eval_batches(examples, setup.processor, setup.pad_id, batch_size, blank_images=True)),
        ),
        "text-only control": mean_loss(
            control,
            on_device(
                eval_batches(
                    examples, control_setup.processor, control_setup.pad_id, batch_size, blank_images=True
                )
            ),
        ),
    }


def run(args: argparse.Namespace) -> dict:
    from mobillama.config import get_preset
    from mobillama.model import MobiLlama
    from mobillama.train.distributed import init_distributed
    from mobillama.train.loop import Trainer
    from mobillama.train.recipe import Recipe
    from mobillama.vision.data import load_caption_examples
    from mobillama.vision.encoder import encoder_config_from_preset, load_local_encoder
    from mobillama.vision.model import MobiLlamaV
    from mobillama.vision.train import build_stage, set_stage

    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    captions = [
        json.loads(line)["caption"] for line in (data / "captions-train.jsonl").read_text().splitlines()
    ]
    tokenizer = train_tokenizer(captions, out / "tokenizer", args.vocab)
    ctx = init_distributed("none", args.device)
    results = {}
    models = {}
    for arm, blank in (("vision", False), ("text-only", True)):
        torch.manual_seed(args.seed)
        decoder = MobiLlama(get_preset(args.decoder).replace(vocab_size=len(tokenizer)))
        if args.encoder:  # a pretrained CLIP/SigLIP from a local directory
            vision_config, encoder = load_local_encoder(args.encoder)
            vision_config.feature_layer, vision_config.drop_cls = args.feature_layer, not args.keep_cls
            model = MobiLlamaV(decoder, vision_config, encoder)
        else:
            vision_config = encoder_config_from_preset(args.encoder_config)
            vision_config.feature_layer, vision_config.drop_cls = args.feature_layer, not args.keep_cls
            model = MobiLlamaV(decoder, vision_config)
        setup = build_stage(
            model,
            1,
            data / "captions-train.jsonl",
            tokenizer,
            micro_batch_size=args.batch_size,
            max_length=64,
            seed=args.seed,
            blank_images=blank,
            augment=args.augment,
        )
        setup.trainable = set_stage(model, 2, train_encoder=args.train_encoder)
        model.to(ctx.device)
        recipe = Recipe(name=f"vision-bench-{arm}", out_dir=str(out / arm))
        recipe.optim.lr, recipe.optim.min_lr, recipe.optim.warmup_steps = args.lr, args.lr / 10, 20
        recipe.optim.weight_decay = 0.0
        recipe.train.max_steps = args.steps
        recipe.eval.every_steps = recipe.checkpoint.every_steps = args.steps
        recipe.log.tensorboard, recipe.log.progress = False, args.progress
        trainer = Trainer(
            model,
            recipe,
            setup.batches,
            ctx=ctx,
            run_dir=out / arm,
            loss_fn=setup.loss_fn,
            model_io=setup.model_io,
            say=print,
        )
        t0 = time.perf_counter()
        summary = trainer.fit()
        results[f"{arm} train_loss"] = summary["loss"]
        results[f"{arm} seconds"] = round(time.perf_counter() - t0, 1)
        models[arm] = (model, setup)
    sets = {"new stamps": "captions-val.jsonl", "new views": "captions-views.jsonl"}
    for set_name, file in sets.items():
        if not (data / file).is_file():
            continue
        examples = load_caption_examples(data / file, tokenizer, 64)
        for key, value in held_out_losses(models, examples, args.batch_size, ctx.device).items():
            results[f"{set_name}: {key}"] = value
        results[f"{set_name}: samples"] = len(examples)
    return results


KEYS = ("vision, real images", "vision, shuffled images", "vision, blank images", "text-only control")


def summarise(per_seed: dict[int, dict]) -> str:
    """The table: per held-out set, each row's mean [95% CI] across seeds, and the paired difference
    real images minus control."""
    from mobillama.study.report import mean_ci, paired_difference

    runs = list(per_seed.values())
    lines = [f"seeds: {', '.join(str(s) for s in per_seed)}"]
    for set_name in ("new stamps", "new views"):
        if f"{set_name}: samples" not in runs[0]:
            continue
        count = runs[0][f"{set_name}: samples"]
        lines.append(f"\nheld-out caption loss, {set_name} ({count} samples), nats/token")
        lines.append(f"{'':<28} {'mean':>8} {'95% CI':>18} {'x control':>10}  per seed")
        base = mean_ci([r[f"{set_name}: text-only control"] for r in runs])[0]
        for key in KEYS:
            values = [r[f"{set_name}: {key}"] for r in runs]
            mean, low, high = mean_ci(values)
            each = " ".join(f"{v:.4f}" for v in values)
            lines.append(f"{key:<28} {mean:8.4f} [{low:7.4f}, {high:7.4f}] {mean / base:10.3f}  {each}")
        if len(runs) >= 2:
            d = paired_difference(
                [r[f"{set_name}: vision, real images"] for r in runs],
                [r[f"{set_name}: text-only control"] for r in runs],
            )
            lines.append(
                f"real images - control: {d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}], "
                f"paired t-test p = {d['p_value']:.3g}"
            )
    for key in ("vision train_loss", "text-only train_loss", "vision seconds", "text-only seconds"):
        lines.append(f"{key:<28} " + " ".join(f"{r[key]:.4g}" for r in runs))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="directory from 'mobillama vision build-data'")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per arm")
    p.add_argument("--batch-size", type=int, default=16, help="samples per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary trained on the captions")
    p.add_argument("--decoder", default="tiny", help="decoder preset")
    p.add_argument(
        "--encoder-config", default="small-64", help="random encoder shape (tiny, small-64, clip-l-336)"
    )
    p.add_argument(
        "--encoder", default=None, help="local CLIP/SigLIP checkpoint directory (instead of random)"
    )
    p.add_argument(
        "--feature-layer",
        type=int,
        default=-2,
        help="encoder hidden state fed to the projector (-2: penultimate)",
    )
    p.add_argument("--keep-cls", action="store_true", help="feed CLIP's CLS token too (LLaVA drops it)")
    p.add_argument("--train-encoder", action="store_true", help="also train the encoder")
    p.add_argument(
        "--augment",
        action="store_true",
        help="train on random views (random shrink and position) of each image",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each trains both arms")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    args = p.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds:
        p.error("--seeds is empty")
    out = Path(args.out)
    per_seed = {}
    for seed in seeds:
        seed_out = out / f"seed-{seed}"
        per_seed[seed] = run(argparse.Namespace(**{**vars(args), "seed": seed, "out": str(seed_out)}))
        (seed_out / "results.json").write_text(json.dumps(per_seed[seed], indent=2) + "\n")
    table = summarise(per_seed)
    print(table)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "per_seed": per_seed}, indent=2) + "\n")
    (out / "results.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
