"""Does MobiLlama-V use the image? Held-out caption loss with images vs the same model without them.

Two runs of the project's training loop, identical in everything (model shape, init seed, data order,
steps, lr) except that the control sees all-zero images ("text-only"). Both train projector + decoder
(+ encoder with --train-encoder) on the offline caption set (``mobillama vision build-data``); nothing is
pretrained, because no registry ships CLIP or LM weights. Reported on the held-out stamps:

- vision model, real images           <- should be lowest
- vision model, images shuffled among the held-out samples (is it the *right* image that helps?)
- text-only control                   <- the baseline

on two held-out sets: stamps never seen in training ("new stamps": needs generalisation to new objects,
which a random encoder cannot give) and new views of training stamps ("new views": shrunk and moved,
so only the image tells which of the ~700 seen captions is meant).

Usage: python benchmarks/vision_caption.py --data DIR --out runs/vision-bench [--steps 400] [--device auto]
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
    from mobillama.vision.model import MobiLlamaV, encoder_config_from_preset, load_local_encoder
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
            model = MobiLlamaV(decoder, vision_config, encoder)
        else:
            model = MobiLlamaV(decoder, encoder_config_from_preset(args.encoder_config))
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
    p.add_argument("--train-encoder", action="store_true", help="also train the (random) encoder")
    p.add_argument(
        "--augment",
        action="store_true",
        help="train on random views (random shrink and position) of each image",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    args = p.parse_args()
    results = run(args)
    keys = ("vision, real images", "vision, shuffled images", "vision, blank images", "text-only control")
    for set_name in ("new stamps", "new views"):
        if f"{set_name}: samples" not in results:
            continue
        count = results[f"{set_name}: samples"]
        print(f"\n{'held-out caption loss, ' + set_name + f' ({count})':<44} nats/token  ratio to text-only")
        base = results[f"{set_name}: text-only control"]
        for key in keys:
            value = results[f"{set_name}: {key}"]
            print(f"{key:<44} {value:.4f}      {value / base:.3f}")
    for key, value in results.items():
        if "seconds" in key or "train_loss" in key:
            print(f"{key:<44} {value}")
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
