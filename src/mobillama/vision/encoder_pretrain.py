"""Contrastive (CLIP) pre-training of a small vision encoder on caption pairs.

Why this exists: LLaVA-style models start from a CLIP encoder that was pre-trained on hundreds of
millions of image-text pairs. No such checkpoint installs offline here, and a *random* frozen encoder
gives features that change with every pixel shift, so a decoder cannot tell that a shrunk or moved
picture shows an object it has seen (docs/vision.md). This module trains transformers' own
``CLIPModel`` (its contrastive loss, its checkpoint format) on a caption JSONL through the project's
training loop, so the result is a standard CLIP directory that ``mobillama vision init --encoder DIR``
and :func:`mobillama.vision.encoder.load_local_encoder` read like any downloaded CLIP.

The text tower reads UTF-8 bytes (id = byte + 1, padding 0, end-of-text 257, pooled at the end-of-text
token): it only exists to give the image tower a training signal and is not used afterwards, so a
byte-level input saves training and shipping a tokenizer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobillama.checkpoint import WEIGHTS_NAME
from mobillama.errors import MobiLlamaError
from mobillama.vision.config import ENCODER_PRESETS, VisionConfig
from mobillama.vision.data import VisionBatches, VisionExample, load_image, random_view, read_caption_pairs
from mobillama.vision.encoder import build_image_processor

PAD_ID, EOT_ID, TEXT_VOCAB = 0, 257, 258
MAX_TEXT_BYTES = 64
REPORT_NAME = "encoder_pretrain.json"


def encode_caption(caption: str) -> list[int]:
    """Byte ids of a caption, cut to fit, ending with the end-of-text id the text tower pools at."""
    return [b + 1 for b in caption.strip().encode("utf-8")][: MAX_TEXT_BYTES - 1] + [EOT_ID]


def clip_config(encoder_config: str, *, text_width: int = 128, projection_dim: int = 128):
    """A ``CLIPConfig``: the vision tower of a named preset and a small byte-level text tower."""
    from transformers import CLIPConfig

    if encoder_config not in ENCODER_PRESETS:
        raise MobiLlamaError(
            f"unknown encoder config {encoder_config!r} (known: {', '.join(ENCODER_PRESETS)})"
        )
    text = dict(
        vocab_size=TEXT_VOCAB,
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TEXT_BYTES,
        pad_token_id=PAD_ID,
        bos_token_id=PAD_ID,
        # not 2: transformers then pools at the first end-of-text id (2 selects the legacy argmax rule)
        eos_token_id=EOT_ID,
    )
    return CLIPConfig(
        text_config=text, vision_config=dict(ENCODER_PRESETS[encoder_config]), projection_dim=projection_dim
    )


def load_pairs(path: str | Path) -> list[VisionExample]:
    """Caption pairs as examples whose ``input_ids`` are the caption's byte ids (no labels)."""
    return [
        VisionExample(name, encode_caption(caption), [], [image])
        for name, image, caption in read_caption_pairs(path)
    ]


class PairBatches(VisionBatches):
    """Image-caption batches for the contrastive loss, with the caption loader's seeded order, exact
    resume and augmentation. ``labels`` holds one target per pair (the index of its partner), which is
    also what the loop counts to average the loss."""

    def collate(self, examples: list[VisionExample], rng: random.Random | None) -> dict[str, torch.Tensor]:
        images = [load_image(e.images[0], e.name) for e in examples]
        if rng is not None:
            images = [random_view(image, rng) for image in images]
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[row, : len(e.input_ids)] = 1
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": pixels,
            "labels": torch.arange(len(examples)),
        }


def contrastive_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (transformers computes it) times the batch size: the loop divides the
    sum by the number of targets, one per pair."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        return_loss=True,
    )
    return out.loss.float() * batch["labels"].numel()


@dataclass
class ClipModelIO:
    """Step checkpoints as CLIP directories (``config.json`` + ``model.safetensors`` +
    ``preprocessor_config.json``): every one of them loads with ``load_local_encoder``."""

    vision_config: VisionConfig
    weights_files: tuple[str, ...] = (WEIGHTS_NAME,)

    def write(self, state: dict[str, torch.Tensor], config, directory: Path, tokenizer_dir=None) -> None:
        from safetensors.torch import save_file

        config.save_pretrained(directory)
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(directory / WEIGHTS_NAME), {"format": "pt"}
        )
        build_image_processor(self.vision_config).save_pretrained(directory)

    def read(self, directory: Path, config) -> dict[str, torch.Tensor]:
        from mobillama.checkpoint import read_safetensors

        return read_safetensors(directory / WEIGHTS_NAME)


@torch.no_grad()
def retrieval_accuracy(
    model: nn.Module, examples: list[VisionExample], processor, batch_size: int = 64
) -> float:
    """Top-1 image -> caption retrieval among the distinct captions of ``examples`` (a caption shared by
    several images counts as right for each of them): does the encoder tell the pictures apart?"""
    model.eval()
    captions = sorted({tuple(e.input_ids) for e in examples})
    index = {c: i for i, c in enumerate(captions)}

    def unit(x) -> torch.Tensor:
        x = getattr(x, "pooler_output", x)  # transformers 5 returns an output object, 4.x a tensor
        return x / x.norm(dim=-1, keepdim=True)

    text = []
    for lo in range(0, len(captions), batch_size):
        chunk = captions[lo : lo + batch_size]
        width = max(len(c) for c in chunk)
        ids = torch.tensor([list(c) + [PAD_ID] * (width - len(c)) for c in chunk])
        text.append(unit(model.get_text_features(input_ids=ids, attention_mask=(ids != PAD_ID).long())))
    text_features = torch.cat(text)
    right = 0
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo : lo + batch_size]
        pixels = processor(images=[load_image(e.images[0], e.name) for e in chunk], return_tensors="pt")
        image = unit(model.get_image_features(pixel_values=pixels["pixel_values"]))
        best = (image @ text_features.T).argmax(-1).tolist()
        right += sum(b == index[tuple(e.input_ids)] for b, e in zip(best, chunk))
    return right / len(examples)


def pretrain_encoder(
    data: str | Path,
    out_dir: str | Path,
    *,
    encoder_config: str = "tiny",
    max_steps: int = 600,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup_steps: int = 50,
    weight_decay: float = 0.1,
    augment: bool = True,
    eval_data: list[str | Path] | None = None,
    seed: int = 0,
    device: str = "auto",
    checkpoint_every: int | None = None,
    resume: str | None = None,
    progress: bool = True,
    say=print,
) -> dict[str, Any]:
    """Train a CLIP model on the caption pairs of ``data`` with the project's training loop and write it
    to ``OUT/final`` (a CLIP directory; ``OUT/final/encoder_pretrain.json`` records the settings, the
    data's hash and the retrieval accuracy on ``data`` and on each ``eval_data`` file)."""
    from transformers import CLIPModel

    from mobillama.checkpoint import atomic_directory, sha256_file, write_json
    from mobillama.train.distributed import init_distributed, shutdown
    from mobillama.train.loop import Trainer
    from mobillama.train.recipe import Recipe
    from mobillama.vision.encoder import encoder_config_from_preset

    out_dir = Path(out_dir)
    if batch_size < 2:
        raise MobiLlamaError(
            f"batch_size must be at least 2 (a contrastive loss needs negatives), got {batch_size}"
        )
    if max_steps < 1:
        raise MobiLlamaError(f"max_steps must be a positive number of steps, got {max_steps}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise MobiLlamaError(f"checkpoint_every must be a positive number of steps, got {checkpoint_every}")
    if (out_dir / "final").exists():
        raise MobiLlamaError(f"output {out_dir / 'final'} already exists (choose another --out)")
    config = clip_config(encoder_config)
    vision_config = encoder_config_from_preset(encoder_config)
    examples = load_pairs(data)
    evals = {str(p): load_pairs(p) for p in eval_data or []}
    if len(examples) < 2:
        raise MobiLlamaError(
            f"{data}: a contrastive loss needs at least 2 caption pairs, found {len(examples)}"
        )
    processor = build_image_processor(vision_config)
    torch.manual_seed(seed)
    model = CLIPModel(config)

    recipe = Recipe(name=f"clip-{encoder_config}", out_dir=str(out_dir))
    recipe.optim.lr, recipe.optim.min_lr = lr, lr / 10
    recipe.optim.warmup_steps, recipe.optim.weight_decay = min(warmup_steps, max_steps), weight_decay
    recipe.batch.micro_batch_size = batch_size
    recipe.train.max_steps, recipe.train.seed, recipe.train.device = max_steps, seed, device
    recipe.eval.every_steps = max_steps
    recipe.checkpoint.every_steps = checkpoint_every or max_steps
    recipe.log.tensorboard, recipe.log.progress = False, progress
    recipe.data.path = str(data)
    ctx = init_distributed("none", device)
    try:
        model.to(ctx.device)
        batches = PairBatches(
            examples,
            processor,
            PAD_ID,
            micro_batch_size=min(batch_size, len(examples)),
            seed=seed,
            augment=augment,
        )
        params = sum(p.numel() for p in model.vision_model.parameters())
        say(f"CLIP pre-training: {len(examples)} pairs, vision tower {encoder_config} ({params:,} params)")
        trainer = Trainer(
            model,
            recipe,
            batches,
            ctx=ctx,
            run_dir=out_dir,
            loss_fn=contrastive_loss_sum,
            model_io=ClipModelIO(vision_config),
            say=say,
        )
        summary = trainer.fit(resume)
        model.cpu()
        accuracy = {str(data): retrieval_accuracy(model, examples, processor)}
        accuracy.update({name: retrieval_accuracy(model, ex, processor) for name, ex in evals.items()})
        for name, value in accuracy.items():
            chance = 1 / len({tuple(e.input_ids) for e in (evals.get(name) or examples)})
            say(f"retrieval top-1 on {name}: {value:.3f} (chance {chance:.4f})")
        report = {
            "encoder_config": encoder_config,
            "data": str(data),
            "data_sha256": sha256_file(data),
            "pairs": len(examples),
            "steps": max_steps,
            "batch_size": batch_size,
            "lr": lr,
            "augment": augment,
            "seed": seed,
            "final_loss": summary.get("loss"),
            "retrieval_top1": accuracy,
        }
        state = {k: v.detach() for k, v in model.state_dict().items()}
        with atomic_directory(out_dir / "final") as tmp:
            ClipModelIO(vision_config).write(state, config, tmp)
            write_json(tmp / REPORT_NAME, report)
        summary.update(checkpoint=str(out_dir / "final"), retrieval_top1=accuracy)
        write_json(out_dir / "summary.json", summary)
        return summary
    finally:
        shutdown(ctx)
