"""The two MobiLlama-V training stages, shaped for the project's one training loop.

This module holds no loop. It decides *what* trains and *on what*:

- stage 1 (feature alignment): caption pairs; only the projector trains (encoder and decoder frozen);
- stage 2 (visual instruction tuning): LLaVA conversations with assistant-only loss; the projector and
  the decoder train, the encoder stays frozen unless ``train_encoder`` is set.

:func:`build_stage` returns the model with ``requires_grad`` set for the stage, a batch source with the
loop's ``next_step()/state_dict()/load_state_dict()`` protocol, the trainable parameters and the loss
function ``loss_fn(model, batch) -> summed loss`` and the ``model_io`` that makes the loop's step
checkpoints MobiLlama-V directories; :func:`run_stage` hands them to ``mobillama.train.loop.Trainer``
and exports the trained model as a MobiLlama-V checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mobillama.errors import MobiLlamaError
from mobillama.vision.checkpoint import VisionModelIO
from mobillama.vision.model import IGNORE_INDEX, MobiLlamaV

STAGES = (1, 2)


def set_stage(model: MobiLlamaV, stage: int, *, train_encoder: bool = False) -> list[str]:
    """Freeze/unfreeze for a stage; returns the names of the parameters that will train."""
    if stage not in STAGES:
        raise MobiLlamaError(f"stage must be 1 or 2, got {stage!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    parts: list[nn.Module] = [model.projector]
    if stage == 2:
        parts.append(model.decoder)
        if train_encoder:
            parts.append(model.encoder)
    for part in parts:
        for p in part.parameters():
            p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def vision_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed fp32 cross-entropy over target tokens (labels already shifted; image slots carry none)."""
    out = model(
        batch["input_ids"],
        pixel_values=batch.get("pixel_values"),
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
    )
    return F.cross_entropy(
        out.logits.float().reshape(-1, out.logits.shape[-1]),
        out.labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@torch.no_grad()
def mean_loss(model: nn.Module, batches) -> float:
    """Mean per-token loss over batches (evaluation; used by tests and the caption benchmark)."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        total += float(vision_loss_sum(model, batch))
        count += int((batch["labels"] != IGNORE_INDEX).sum())
    return total / max(count, 1)


@dataclass
class StageSetup:
    model: MobiLlamaV
    batches: Any  # VisionBatches
    val_examples: list
    trainable: list[str]
    loss_fn: Any
    processor: Any
    pad_id: int
    model_io: VisionModelIO  # step checkpoints as MobiLlama-V directories (Trainer(model_io=...))


def build_stage(
    model: MobiLlamaV,
    stage: int,
    data: str | Path,
    tokenizer,
    *,
    micro_batch_size: int = 4,
    grad_accum: int = 1,
    max_length: int = 512,
    val_fraction: float = 0.0,
    seed: int = 0,
    train_encoder: bool = False,
    rank: int = 0,
    world_size: int = 1,
    blank_images: bool = False,
    augment: bool = False,
) -> StageSetup:
    """Everything the loop needs for one stage (see the module docstring)."""
    from mobillama.vision.data import VisionBatches, load_caption_examples, load_llava_examples
    from mobillama.vision.encoder import build_image_processor

    if stage == 1:
        examples = load_caption_examples(data, tokenizer, max_length)
    else:
        examples, _ = load_llava_examples(data, tokenizer, max_length)
    n_val = int(len(examples) * val_fraction)
    val, train = examples[:n_val], examples[n_val:]
    if not train:
        raise MobiLlamaError(f"{data}: no training samples left after holding out {n_val} for validation")
    hf = getattr(tokenizer, "hf", tokenizer)
    pad_id = hf.pad_token_id if hf.pad_token_id is not None else (hf.eos_token_id or 0)
    processor = build_image_processor(model.vision_config)
    trainable = set_stage(model, stage, train_encoder=train_encoder)
    batches = VisionBatches(
        train,
        processor,
        pad_id,
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        seed=seed,
        rank=rank,
        world_size=world_size,
        blank_images=blank_images,
        augment=augment,
    )
    return StageSetup(
        model, batches, val, trainable, vision_loss_sum, processor, pad_id, VisionModelIO(model.vision_config)
    )


def run_stage(
    checkpoint: str | Path,
    stage: int,
    data: str | Path,
    out_dir: str | Path,
    *,
    max_steps: int = 100,
    lr: float = 1e-3,
    warmup_steps: int = 10,
    micro_batch_size: int = 4,
    grad_accum: int = 1,
    max_length: int = 512,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_encoder: bool = False,
    device: str = "auto",
    checkpoint_every: int | None = None,
    resume: str | None = None,
    say=print,
) -> dict[str, Any]:
    """Train one stage from a MobiLlama-V checkpoint with the project's training loop; the result is a
    MobiLlama-V checkpoint at ``OUT/final`` (the loop's own run files sit beside it).

    Every ``checkpoint_every`` steps (default: only at the end) the loop writes
    ``OUT/checkpoints/step-N``, itself a MobiLlama-V directory (``MobiLlamaV.from_pretrained`` loads it)
    plus the optimizer/RNG/data state; ``resume`` ("auto" or such a path) continues from one.
    """
    try:
        from mobillama.train.distributed import init_distributed, shutdown, wrap_model
        from mobillama.train.loop import Trainer
        from mobillama.train.recipe import Recipe
    except ImportError:
        raise MobiLlamaError(
            "the training engine (mobillama.train) is not installed in this build; "
            "vision training runs through it"
        ) from None
    from transformers import AutoTokenizer

    from mobillama.vision.data import eval_batches

    out_dir = Path(out_dir)
    if (out_dir / "final").exists():
        raise MobiLlamaError(f"output {out_dir / 'final'} already exists (choose another --out)")
    torch.manual_seed(seed)
    model = MobiLlamaV.from_pretrained(checkpoint).train()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    except (OSError, ValueError) as e:
        raise MobiLlamaError(f"{checkpoint}: no usable tokenizer files ({str(e).splitlines()[0]})") from None
    recipe = Recipe(name=f"vision-stage{stage}", out_dir=str(out_dir))
    recipe.optim.lr, recipe.optim.min_lr = lr, lr / 10
    recipe.optim.warmup_steps = warmup_steps
    recipe.optim.weight_decay = 0.0
    recipe.batch.micro_batch_size = micro_batch_size
    recipe.train.max_steps, recipe.train.seed, recipe.train.device = max_steps, seed, device
    recipe.eval.every_steps = recipe.checkpoint.every_steps = max_steps
    if checkpoint_every is not None:
        if checkpoint_every < 1:
            raise MobiLlamaError(
                f"checkpoint_every must be a positive number of steps, got {checkpoint_every}"
            )
        recipe.checkpoint.every_steps = checkpoint_every
    recipe.log.tensorboard = False
    recipe.data.path = str(data)
    ctx = init_distributed(recipe.train.strategy, recipe.train.device)
    try:
        setup = build_stage(
            model,
            stage,
            data,
            tokenizer,
            micro_batch_size=micro_batch_size,
            grad_accum=grad_accum,
            max_length=max_length,
            val_fraction=val_fraction,
            seed=seed,
            train_encoder=train_encoder,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        model.to(ctx.device)
        say(
            f"stage {stage}: {len(setup.trainable)} trainable tensors "
            f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} params), "
            f"{len(setup.batches.examples)} train / {len(setup.val_examples)} val samples"
        )
        val = None
        if setup.val_examples:

            def val():
                return eval_batches(setup.val_examples, setup.processor, setup.pad_id, micro_batch_size)

        trainer = Trainer(
            wrap_model(model, ctx),
            recipe,
            setup.batches,
            ctx=ctx,
            run_dir=out_dir,
            val_batches=val,
            loss_fn=setup.loss_fn,
            tokenizer_dir=checkpoint,
            model_io=setup.model_io,
            say=say,
        )
        summary = trainer.fit(resume)
        if ctx.is_main:
            model.save_pretrained(out_dir / "final", tokenizer_dir=checkpoint)
            summary["checkpoint"] = str(out_dir / "final")
        return summary
    finally:
        shutdown(ctx)
