"""``mobillama pretrain``: recipe + token shards -> a run directory (wires the pieces, holds no logic of its own).

Run directory layout (docs/training.md)::

    RUN/recipe.yaml          the resolved recipe (overrides applied)
    RUN/run.json             lineage: data manifest hash, init checkpoint, world size, code version
    RUN/metrics.jsonl        one record per logged step / evaluation
    RUN/tensorboard/         TensorBoard event files
    RUN/checkpoints/step-N/  training checkpoints (HF model dir + optimizer/loader/RNG state)
    RUN/checkpoints.json|csv every checkpoint with step, tokens, loss, data position, hashes
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mobillama.checkpoint import sha256_file, write_json
from mobillama.data.loader import StepBatches, TokenSplit, ValidationBatches, check_vocab
from mobillama.errors import MobiLlamaError
from mobillama.train.distill import distill_loss_sum, freeze_all_but_ffns, load_teacher
from mobillama.train.distributed import init_distributed, shutdown, wrap_model
from mobillama.train.loop import Trainer, compile_for_training, lm_loss_sum, summed_cross_entropy
from mobillama.train.recipe import Recipe, save_recipe


def grad_accumulation(recipe: Recipe, seq_len: int, world_size: int) -> int:
    """Micro-batches per step so that one step is ``batch.global_batch_tokens`` tokens over all ranks."""
    per_pass = recipe.batch.micro_batch_size * seq_len * world_size
    accum, rest = divmod(recipe.batch.global_batch_tokens, per_pass)
    if rest or accum < 1:
        raise MobiLlamaError(
            f"recipe key 'batch.global_batch_tokens' ({recipe.batch.global_batch_tokens}) must be a multiple of "
            f"micro_batch_size x seq_len x world size = {recipe.batch.micro_batch_size} x {seq_len} x {world_size}"
        )
    return accum


def find_tokenizer_dir(data_dir: Path, manifest: dict[str, Any]) -> Path | None:
    """The tokenizer the shards were made with, if the data directory records or contains it."""
    for candidate in (manifest.get("tokenizer_dir"), manifest.get("tokenizer"), "tokenizer"):
        if isinstance(candidate, str) and candidate:
            path = Path(candidate) if Path(candidate).is_absolute() else data_dir / candidate
            if path.is_dir():
                return path
    return None


def choose_tokenizer_dir(
    data_dir: Path,
    manifest: dict[str, Any],
    init_from: str | Path | None,
    say: Callable[[str], None] = print,
) -> Path | None:
    """The tokenizer the run's checkpoints carry. Continuing from a checkpoint that has one: that one,
    unless the data names another of the same vocabulary size (then the data's, with a notice: the shards
    were encoded with it); another size is an error, since the ids would mean other tokens."""
    data_tok = find_tokenizer_dir(data_dir, manifest)
    ckpt = Path(init_from) if init_from else None
    if ckpt is None or not any((ckpt / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        return data_tok
    if data_tok is None:
        return ckpt
    from mobillama.tokenizer import load_tokenizer

    theirs, ours = load_tokenizer(ckpt), load_tokenizer(data_tok)
    if theirs.sha256 == ours.sha256:
        return ckpt
    if theirs.vocab_size != ours.vocab_size:
        raise MobiLlamaError(
            f"{data_dir}: the shards were made with a tokenizer of {ours.vocab_size} tokens ({data_tok}) but "
            f"--init-from {ckpt} carries one of {theirs.vocab_size}: prepare the data with the checkpoint's"
        )
    say(
        f"note: the data's tokenizer {data_tok} differs from --init-from {ckpt}'s (same vocab size "
        f"{ours.vocab_size}); the run's checkpoints carry the data's"
    )
    return data_tok


def run_pretrain(
    recipe: Recipe, *, resume: str | None = None, init_from: str | None = None, say=print
) -> dict[str, Any]:
    """Train ``recipe`` (single process, or every rank of a torchrun launch) and return a summary.

    With a ``distill`` section the loss distils from its teacher (:mod:`mobillama.train.distill`)."""
    from mobillama.model import MobiLlama, flops_per_token
    from mobillama.train.state import code_version, load_init_weights

    init_from = init_from or recipe.model.init_from
    ctx = init_distributed(recipe.train.strategy, recipe.train.device)
    try:
        if init_from:  # continued training: the shape is the checkpoint's, not the recipe's preset
            config = recipe.init_model_config(init_from)
            if ctx.is_main:
                say(
                    f"model: shape from --init-from {init_from} ({config.num_hidden_layers}L/"
                    f"{config.hidden_size}h, ffn_sharing={config.ffn_sharing}, tie_word_embeddings="
                    f"{config.tie_word_embeddings}); recipe preset {recipe.model.preset!r} not used"
                )
            recipe.model.init_from = str(init_from)  # the run directory's recipe.yaml reproduces the run
        else:
            config = recipe.model_config()
        data_dir = Path(recipe.data.path)
        train_split = TokenSplit(data_dir, recipe.data.train_split, verify=recipe.data.verify_hashes)
        check_vocab(train_split, config.vocab_size)
        seq_len = train_split.seq_len
        if seq_len > config.max_position_embeddings:
            raise MobiLlamaError(
                f"{data_dir}: seq_len {seq_len} exceeds the model's max_position_embeddings "
                f"{config.max_position_embeddings}"
            )
        val_split = None
        if recipe.data.val_split in train_split.manifest["splits"]:
            val_split = TokenSplit(data_dir, recipe.data.val_split, verify=recipe.data.verify_hashes)
            if len(val_split) < recipe.batch.micro_batch_size * ctx.world_size:
                say(f"note: validation split has only {len(val_split)} samples; no evaluation")
                val_split = None
        accum = grad_accumulation(recipe, seq_len, ctx.world_size)
        tokenizer_dir = choose_tokenizer_dir(
            data_dir, train_split.manifest, init_from, say if ctx.is_main else (lambda _: None)
        )

        torch.manual_seed(recipe.train.seed)
        model = MobiLlama(config)
        if init_from:
            load_init_weights(model, init_from)
        model.model.gradient_checkpointing = recipe.model.gradient_checkpointing
        model.to(ctx.device)
        if recipe.model.train_only == "ffn":
            trainable = freeze_all_but_ffns(model)
            if ctx.is_main:
                say(f"training the FFNs only ({trainable:,} of {model.num_parameters():,} parameters)")
        cross_entropy = compile_for_training(model) if recipe.model.compile else summed_cross_entropy
        loss_fn = val_loss_fn = functools.partial(lm_loss_sum, cross_entropy=cross_entropy)
        distill = recipe.distill
        if distill is not None:
            teacher = load_teacher(distill.teacher, config, tokenizer_dir, ctx.device)
            loss_fn = functools.partial(
                distill_loss_sum,
                teacher=teacher,
                temperature=distill.temperature,
                alpha=distill.alpha,
                cross_entropy=cross_entropy,
            )
            if ctx.is_main:
                say(
                    f"distilling from {distill.teacher} (temperature {distill.temperature}, alpha {distill.alpha}); "
                    "val_loss is the plain next-token loss"
                )
        wrapped = wrap_model(model, ctx)

        batches = StepBatches(
            train_split,
            micro_batch_size=recipe.batch.micro_batch_size,
            grad_accum=accum,
            rank=ctx.rank,
            world_size=ctx.world_size,
            seed=recipe.data.seed,
        )
        val = None
        if val_split is not None:
            val = ValidationBatches(
                val_split,
                recipe.batch.micro_batch_size,
                ctx.rank,
                ctx.world_size,
                recipe.eval.max_batches,
                seed=recipe.data.seed,
            )
        run_dir = recipe.run_dir
        lineage = {
            "data": {
                "path": str(data_dir),
                "manifest_sha256": sha256_file(data_dir / "manifest.json"),
                "tokenizer_sha256": train_split.manifest.get("tokenizer_sha256"),
                "seq_len": seq_len,
                "train_samples": len(train_split),
                "validation": val.description if val is not None else None,
            },
            "init_from": str(init_from) if init_from else None,
            "tokenizer_dir": str(tokenizer_dir) if tokenizer_dir else None,
            "world_size": ctx.world_size,
            "strategy": ctx.strategy,
            "grad_accum": accum,
            "params": model.num_parameters(),
            "train_only": recipe.model.train_only,
        }
        if distill is not None:
            lineage["distill"] = {
                "teacher": str(distill.teacher),
                "teacher_model_sha256": sha256_file(Path(distill.teacher) / "model.safetensors"),
                "temperature": distill.temperature,
                "alpha": distill.alpha,
            }
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, run_dir / "recipe.yaml")
            if init_from:
                lineage["init_from_sha256"] = sha256_file(Path(init_from) / "model.safetensors")
            write_json(run_dir / "run.json", {**lineage, "code_version": code_version()})
            say(
                f"training {config.num_hidden_layers}L/{config.hidden_size}h ({model.num_parameters():,} params, "
                f"ffn_sharing={config.ffn_sharing}) on {len(train_split):,} samples of {seq_len} tokens; "
                f"{ctx.strategy} x{ctx.world_size} on {ctx.device}, accumulation {accum}, run dir {run_dir}"
            )
        trainer = Trainer(
            wrapped,
            recipe,
            batches,
            ctx=ctx,
            run_dir=run_dir,
            val_batches=val,
            loss_fn=loss_fn,
            val_loss_fn=val_loss_fn,
            flops_per_token=flops_per_token(config, seq_len),
            tokenizer_dir=tokenizer_dir,
            extra_state={"lineage": lineage},
            say=say,
        )
        return trainer.fit(resume)
    finally:
        shutdown(ctx)
