"""``mobillama sft``: a base checkpoint + conversation files -> an instruction-tuned run directory.

This wires the SFT pieces into the one training loop (:class:`mobillama.train.loop.Trainer`); it holds no
loop of its own. Conversations are loaded (skips counted by reason), rendered with the base checkpoint's
chat template and tokenised with assistant-only labels (:mod:`.masking`), then shifted so that
``labels[t]`` is the target at position t, as the loop expects. Epochs and a warmup ratio are turned
into ``train.max_steps`` and ``optim.warmup_steps``.

Full fine-tuning trains :class:`mobillama.model.MobiLlama` and writes the same checkpoints as
pre-training (each carries the tokenizer and its chat template, so ``mobillama chat``, ``serve`` and
transformers apply it). LoRA wraps :class:`mobillama.hf.MobiLlamaForCausalLM` with peft; its checkpoints
hold the adapter (``save_pretrained``) plus the optimizer/loader/RNG state, and ``mobillama lora merge``
folds an adapter back into a plain checkpoint.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from mobillama.checkpoint import (
    TOKENIZER_FILES,
    atomic_directory,
    copy_tokenizer_files,
    load_checkpoint,
    load_model,
    read_safetensors,
    save_checkpoint,
    sha256_file,
    write_json,
)
from mobillama.data.loader import StepBatches
from mobillama.errors import MobiLlamaError
from mobillama.model import MobiLlama
from mobillama.sft.formats import load_conversations
from mobillama.sft.masking import IGNORE_INDEX, Example, collate, tokenize_conversation, truncate
from mobillama.sft.recipe import SFTRecipe
from mobillama.tokenizer import load_tokenizer
from mobillama.train.distributed import init_distributed, shutdown, unwrap, wrap_model
from mobillama.train.loop import CrossEntropyFn, Trainer, compile_for_training, summed_cross_entropy
from mobillama.train.recipe import save_recipe
from mobillama.train.state import (
    CKPT_DIR,
    STATE_NAME,
    _hash_tree,
    apply_retention,
    checkpoint_name,
    code_version,
    flatten_optimizer,
    load_init_weights,
    unflatten_optimizer,
)

UNLIMITED = 1 << 30


def sft_loss_sum(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    cross_entropy: CrossEntropyFn = summed_cross_entropy,
) -> torch.Tensor:
    """Summed cross-entropy over assistant tokens (labels already shifted; -100 ignored).

    Works for the plain model (returns logits) and the HF/peft model (returns an output with ``.logits``);
    packed rows pass ``segment_ids`` so attention stays inside each conversation.
    """
    if "segment_ids" in batch:
        kwargs = {"segment_ids": batch["segment_ids"]}
    else:
        kwargs = {"attention_mask": batch.get("attention_mask")}
    out = model(input_ids=batch["input_ids"], **kwargs)
    return cross_entropy(getattr(out, "logits", out), batch["labels"])


def check_base(base: str | Path) -> Path:
    """The base checkpoint must exist, hold weights and carry a tokenizer (its chat template is the SFT format)."""
    base = Path(base)
    if not (base / "config.json").is_file():
        raise MobiLlamaError(f"base checkpoint {base} not found (no config.json); set model.base")
    if not any((base / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise MobiLlamaError(
            f"base checkpoint {base} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); "
            "SFT renders conversations with the checkpoint's own tokenizer and chat template"
        )
    return base


def encode_conversations(
    tokenizer, conversations: list[list[dict[str, str]]], max_length: int
) -> tuple[list[Example], dict[str, int]]:
    """Shifted training examples (``labels[t]`` = target at t) and truncation counts.

    ``max_length`` bounds the rendered conversation; after the shift a row holds ``max_length - 1`` inputs.
    """
    examples: list[Example] = []
    stats = Counter(conversations=len(conversations))
    for conv in conversations:
        full = tokenize_conversation(tokenizer, conv, UNLIMITED)
        if full is None:
            stats["skipped_no_assistant_tokens"] += 1
            continue
        ex = truncate(full, max_length) if len(full.input_ids) > max_length else full
        if len(full.input_ids) > max_length:
            stats["truncated"] += 1
        if ex is None or len(ex.input_ids) < 2:
            stats["skipped_truncated_to_prompt"] += 1
            continue
        examples.append(Example(ex.input_ids[:-1], ex.labels[1:]))
        stats["examples"] += 1
        stats["target_tokens"] += sum(1 for label in ex.labels[1:] if label != IGNORE_INDEX)
    return examples, dict(stats)


def eval_batches(
    examples: list[Example], micro: int, collate_fn, max_batches: int, rank: int = 0, world_size: int = 1
) -> list[dict[str, torch.Tensor]]:
    """This rank's validation batches: batch i of every round of ``world_size`` batches goes to rank i.

    Every rank gets the same number of batches (collectives must match); a last round that cannot give
    each rank a batch is dropped in distributed runs only.
    """
    batches = [examples[i : i + micro] for i in range(0, len(examples), micro)]
    if max_batches:
        batches = batches[: max_batches * world_size]
    if world_size > 1:
        batches = batches[: len(batches) // world_size * world_size][rank::world_size]
    return [collate_fn(b) for b in batches]


def _silent(_message: str) -> None:
    """``say`` on ranks other than 0: one process speaks for the run."""


def resolve_schedule(recipe: SFTRecipe, steps_per_epoch: int) -> None:
    """Fill ``train.max_steps`` from epochs and ``optim.warmup_steps`` from the warmup ratio (in place)."""
    if recipe.train.max_steps == 0:
        recipe.train.max_steps = max(1, math.ceil(recipe.train.epochs * steps_per_epoch))
    if recipe.optim.warmup_ratio > 0:
        recipe.optim.warmup_steps = math.ceil(recipe.optim.warmup_ratio * recipe.train.max_steps)


# --- LoRA -----------------------------------------------------------------------------------------------


def apply_lora(model: nn.Module, lora) -> nn.Module:
    """Wrap an HF MobiLlama in peft LoRA adapters on the named projections.

    The shared FFN is one module (``model.ffns.0``) used by every layer, so it gets one adapter per target
    projection, shared exactly like its weights; peft sees each module once.
    """
    # peft imports transformers (~2.5 s): kept to the LoRA paths, so full fine-tuning never loads it
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


class LoraTrainer(Trainer):
    """The loop's checkpoints for a LoRA run: adapter (peft ``save_pretrained``) + trainable-state resume.

    Under DDP the adapter and optimizer state are replicated, so rank 0 writes them; every rank's RNG
    state is gathered so each resumes its own stream.
    """

    def save(self) -> Path:
        final = self.run_dir / CKPT_DIR / checkpoint_name(self.step)
        rngs = [{"cpu": torch.get_rng_state()}]
        if self.ctx.distributed:
            rngs = [None] * self.ctx.world_size
            dist.all_gather_object(rngs, {"cpu": torch.get_rng_state()})
        if self.ctx.is_main:
            with atomic_directory(final, overwrite=True) as tmp:
                unwrap(self.model).save_pretrained(str(tmp))
                if self.tokenizer_dir:
                    copy_tokenizer_files(self.tokenizer_dir, tmp)
                tensors, meta = flatten_optimizer(self._optimizer_state())
                save_file(tensors, str(tmp / "optimizer.safetensors"))
                write_json(tmp / "optimizer.json", meta)
                save_file(
                    {f"rank{r}.{k}": v for r, d in enumerate(rngs) for k, v in d.items()},
                    str(tmp / "rng.safetensors"),
                )
                state = dict(
                    self.trainer_state(),
                    code_version=dict(code_version()),
                    world_size=self.ctx.world_size,
                    strategy=self.ctx.strategy,
                    lora=True,
                )
                state["files"] = _hash_tree(tmp)
                write_json(tmp / STATE_NAME, state)
            cp = self.recipe.checkpoint
            apply_retention(
                self.run_dir, cp.keep_last, cp.keep_every_steps, final_step=self.recipe.train.max_steps
            )
        self.ctx.barrier()
        return final

    def _named_parameters(self):
        return unwrap(self.model).named_parameters()

    def _optimizer_state(self) -> dict[str, Any]:
        """AdamW state keyed by trainable parameter name (the layout ``flatten_optimizer`` expects)."""
        osd = self.optimizer.state_dict()
        index_to_name = dict(enumerate(self._param_names_in_optimizer_order()))
        state = {index_to_name[i]: s for i, s in osd["state"].items()}
        groups = [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [index_to_name[i] for i in g["params"]],
            }
            for g in osd["param_groups"]
        ]
        return {"state": state, "param_groups": groups}

    def _param_names_in_optimizer_order(self) -> list[str]:
        names = {id(p): n for n, p in self._named_parameters()}
        return [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def load_checkpoint_state(self, path: Path) -> dict[str, Any]:
        """Adapter weights, optimizer and RNG state of a LoRA checkpoint (the base weights never change)."""
        from peft import set_peft_model_state_dict  # LoRA only, as in apply_lora

        if not (path / "adapter_model.safetensors").is_file():
            raise MobiLlamaError(
                f"cannot resume a LoRA run from {path}: it holds no adapter_model.safetensors"
            )
        set_peft_model_state_dict(unwrap(self.model), read_safetensors(path / "adapter_model.safetensors"))
        meta = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
        osd = unflatten_optimizer(read_safetensors(path / "optimizer.safetensors"), meta)
        name_to_index = {n: i for i, n in enumerate(self._param_names_in_optimizer_order())}
        self.optimizer.load_state_dict(
            {
                "state": {name_to_index[n]: s for n, s in osd["state"].items()},
                "param_groups": [
                    {**g, "params": [name_to_index[n] for n in g["params"]]} for g in osd["param_groups"]
                ],
            }
        )
        rng = read_safetensors(path / "rng.safetensors")
        mine = f"rank{self.ctx.rank}.cpu"
        torch.set_rng_state(rng[mine] if mine in rng else rng["rank0.cpu"])
        return json.loads((path / STATE_NAME).read_text(encoding="utf-8"))


def merge_lora(base: str | Path, adapter: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Fold a LoRA adapter into its base weights and write a plain project checkpoint (with tokenizer)."""
    from peft import PeftModel  # LoRA only, as in apply_lora

    from mobillama.hf import MobiLlamaForCausalLM  # transformers: only LoRA merges and runs need it

    base, adapter = Path(base), Path(adapter)
    if not (base / "config.json").is_file():
        raise MobiLlamaError(f"base checkpoint {base} not found (no config.json)")
    if not (adapter / "adapter_config.json").is_file():
        raise MobiLlamaError(f"{adapter} is not a LoRA adapter directory (no adapter_config.json)")
    model = MobiLlamaForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
    try:
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (ValueError, RuntimeError, KeyError) as e:
        raise MobiLlamaError(f"cannot apply adapter {adapter} to {base}: {str(e).splitlines()[0]}") from None
    tokenizer_src = adapter if (adapter / "tokenizer.json").is_file() else base
    state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    config = merged.config.to_model_config()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_checkpoint(state, config, out, tokenizer_dir=tokenizer_src, overwrite=overwrite)
    return Path(out)


# --- the run --------------------------------------------------------------------------------------------


def run_sft(recipe: SFTRecipe, *, resume: str | None = None, say=print) -> dict[str, Any]:
    """Fine-tune ``recipe.model.base`` on ``recipe.data``: one process, or DDP/FSDP2 under torchrun.

    Every rank tokenises the whole file (deterministic, so all agree) and takes its slice of each step's
    conversations; the loop normalises by the global count of assistant tokens, so N processes x B
    conversations give the same update as one process with N x B (tests/sft/test_distributed.py).
    """
    base = check_base(recipe.model.base)
    tokenizer = load_tokenizer(base)  # adds the MobiLlama-Chat template when the files carry none
    conversations, train_report = load_conversations(recipe.data.train, recipe.data.format)
    train_examples, train_stats = encode_conversations(tokenizer, conversations, recipe.data.max_length)
    val_examples, val_report, val_stats = [], None, None
    if recipe.data.val:
        val_convs, val_report = load_conversations(recipe.data.val, recipe.data.format)
        val_examples, val_stats = encode_conversations(tokenizer, val_convs, recipe.data.max_length)
    ctx = init_distributed(recipe.train.strategy, recipe.train.device)
    try:
        if not ctx.is_main:
            say = _silent
        micro, accum = recipe.batch.micro_batch_size, recipe.batch.grad_accum
        per_step = micro * accum * ctx.world_size  # conversations per optimizer step, all ranks together
        steps_per_epoch = len(train_examples) // per_step
        if steps_per_epoch == 0:
            raise MobiLlamaError(
                f"{recipe.data.train}: {len(train_examples)} usable conversations, fewer than one step "
                f"(batch.micro_batch_size x batch.grad_accum x {ctx.world_size} process(es) = {per_step})"
            )
        resolve_schedule(recipe, steps_per_epoch)
        if recipe.lora is not None and ctx.strategy == "fsdp2":
            raise MobiLlamaError(
                "LoRA runs replicate the (frozen) base on every process: use train.strategy=ddp, not fsdp2"
            )
        config, _ = load_checkpoint(base)
        if recipe.data.max_length > config.max_position_embeddings:
            raise MobiLlamaError(
                f"recipe key 'data.max_length' ({recipe.data.max_length}) exceeds the base model's "
                f"max_position_embeddings {config.max_position_embeddings}"
            )
        torch.manual_seed(recipe.train.seed)
        if recipe.lora is None:
            model = MobiLlama(config)
            load_init_weights(model, base)
            model.model.gradient_checkpointing = recipe.model.gradient_checkpointing
        else:
            from mobillama.hf import MobiLlamaForCausalLM  # transformers: LoRA runs only

            hf_model = MobiLlamaForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
            hf_model.model.gradient_checkpointing = recipe.model.gradient_checkpointing
            model = apply_lora(hf_model, recipe.lora)
        model.to(ctx.device)
        loss_fn = sft_loss_sum
        if recipe.model.compile:
            loss_fn = functools.partial(sft_loss_sum, cross_entropy=compile_for_training(model))
        trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model = wrap_model(model, ctx)

        pack_to = recipe.data.max_length if recipe.data.packing else None
        collate_fn = functools.partial(collate, pad_id=tokenizer.pad_id, pack_to=pack_to)
        batches = StepBatches(
            train_examples,
            micro_batch_size=micro,
            grad_accum=accum,
            rank=ctx.rank,
            world_size=ctx.world_size,
            seed=recipe.data.seed,
            collate=collate_fn,
        )
        val = None
        if val_examples:
            val = functools.partial(
                eval_batches,
                val_examples,
                micro,
                collate_fn,
                recipe.eval.max_batches,
                ctx.rank,
                ctx.world_size,
            )

        run_dir = recipe.run_dir
        tokenizer_dir = run_dir / "tokenizer"
        lineage = {
            "base": str(base),
            "base_sha256": sha256_file(base / "model.safetensors"),
            "data": {
                "train": str(recipe.data.train),
                "train_sha256": sha256_file(recipe.data.train),
                "train_load": train_report.to_dict(),
                "train_encode": train_stats,
                "val": str(recipe.data.val) if recipe.data.val else None,
                "val_load": val_report.to_dict() if val_report else None,
                "val_encode": val_stats,
            },
            "steps_per_epoch": steps_per_epoch,
            "max_steps": recipe.train.max_steps,
            "warmup_steps": recipe.optim.warmup_steps,
            "lora": recipe.lora.__dict__ if recipe.lora else None,
            "trainable_params": trainable_params,
            "world_size": ctx.world_size,
            "strategy": ctx.strategy,
        }
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, run_dir / "recipe.yaml")
            write_json(run_dir / "run.json", {**lineage, "code_version": code_version()})
            if not tokenizer_dir.is_dir():
                tokenizer.save(tokenizer_dir)
            write_json(run_dir / "data_report.json", lineage["data"])  # skips by reason + truncation counts
        ctx.barrier()
        skipped = {**train_report.skipped}
        say(
            f"sft: {train_report.kept} conversations kept from {recipe.data.train}"
            + (f", skipped {skipped}" if skipped else "")
            + f"; {train_stats.get('truncated', 0)} truncated to {recipe.data.max_length} tokens, "
            f"{train_stats.get('skipped_truncated_to_prompt', 0)} dropped (no assistant token left)"
        )
        say(
            f"sft: {'LoRA' if recipe.lora else 'full'} fine-tuning of {base} on {ctx.world_size} process(es) "
            f"({lineage['trainable_params']:,} trainable params), {len(train_examples)} examples, "
            f"{steps_per_epoch} steps/epoch, {recipe.train.max_steps} steps, warmup {recipe.optim.warmup_steps}; "
            f"run dir {run_dir}"
        )
        trainer_cls = LoraTrainer if recipe.lora else Trainer
        trainer = trainer_cls(
            model,
            recipe,
            batches,
            ctx=ctx,
            run_dir=run_dir,
            val_batches=val,
            loss_fn=loss_fn,
            tokenizer_dir=tokenizer_dir,
            extra_state={"lineage": lineage},
            say=say,
        )
        return trainer.fit(resume)
    finally:
        shutdown(ctx)


@torch.no_grad()
def assistant_token_loss(
    checkpoint: str | Path, conversations: str | Path, *, max_length: int = 2048, batch_size: int = 8
) -> dict[str, float]:
    """Mean cross-entropy over the assistant tokens of a conversation file (the SFT held-out metric).

    Uses the checkpoint's own tokenizer and chat template and the same masking as training, so the
    numbers before and after fine-tuning are directly comparable.
    """
    model = load_model(check_base(checkpoint))
    tokenizer = load_tokenizer(checkpoint)
    convs, _ = load_conversations(conversations)
    examples, stats = encode_conversations(tokenizer, convs, max_length)
    collate_fn = functools.partial(collate, pad_id=tokenizer.pad_id)
    total, count = 0.0, 0
    for batch in eval_batches(examples, batch_size, collate_fn, 0):
        total += float(sft_loss_sum(model, batch))
        count += int((batch["labels"] != IGNORE_INDEX).sum())
    return {"loss": total / count, "tokens": count, "conversations": len(examples)}
