"""SFT recipes: the pre-training recipe with the sections fine-tuning needs instead of shards and presets.

Same strict loader (:func:`mobillama.train.recipe.load_recipe` with ``cls=SFTRecipe``): an unknown key or a
wrong type names the key. What differs from pre-training:

- ``model.base``: the checkpoint to fine-tune (its config, weights and tokenizer; no preset).
- ``data``: conversation files (ShareGPT, OpenAI messages or Alpaca JSONL) instead of token shards.
- ``batch``: conversations per micro-batch and accumulation steps (conversations vary in length, so a
  step is counted in conversations, not tokens).
- ``train.epochs`` derives ``max_steps`` (when ``train.max_steps`` is 0); ``optim.warmup_ratio`` derives
  ``warmup_steps`` (when > 0), as the paper's chat recipe states them.
- ``lora``: optional LoRA adapters (peft) instead of full fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mobillama.errors import MobiLlamaError
from mobillama.train.recipe import OptimSection, Recipe, TrainSection

FORMATS = ("auto", "sharegpt", "messages", "alpaca")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class SFTModelSection:
    # Checkpoint directory to fine-tune (config.json + model.safetensors + tokenizer files).
    base: str = ""
    gradient_checkpointing: bool = False
    compile: bool = False


@dataclass
class SFTDataSection:
    # Conversation file for training (JSONL or a JSON array; see mobillama.sft.formats).
    train: str = "runs/sft-data/train.jsonl"
    # Optional held-out conversation file: its assistant-token loss is the run's val_loss.
    val: str | None = None
    # "auto" (detected from the first usable record), "sharegpt", "messages" or "alpaca".
    format: str = "auto"
    # Tokens per conversation after truncation (never ends on a dangling prompt).
    max_length: int = 2048
    # Pack each micro-batch's conversations into rows of max_length (attention kept per conversation).
    packing: bool = False
    # Seed of the per-epoch conversation order.
    seed: int = 1234


@dataclass
class SFTBatchSection:
    # Conversations per forward pass on one rank.
    micro_batch_size: int = 4
    # Micro-batches per optimizer step (the paper's chat recipe: 16).
    grad_accum: int = 16


@dataclass
class SFTTrainSection(TrainSection):
    max_steps: int = 0  # 0: derived from epochs
    epochs: float = 3.0


@dataclass
class SFTOptimSection(OptimSection):
    lr: float = 2e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # Fraction of the run spent in linear warmup; > 0 overrides warmup_steps.
    warmup_ratio: float = 0.0


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Module names (inside every layer, and the shared FFN once): any of LORA_TARGETS.
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class SFTRecipe(Recipe):
    model: SFTModelSection = field(default_factory=SFTModelSection)
    data: SFTDataSection = field(default_factory=SFTDataSection)
    optim: SFTOptimSection = field(default_factory=SFTOptimSection)
    batch: SFTBatchSection = field(default_factory=SFTBatchSection)
    train: SFTTrainSection = field(default_factory=SFTTrainSection)
    lora: LoraSection | None = None

    def positive_values(self) -> dict[str, Any]:
        return {
            "batch.micro_batch_size": self.batch.micro_batch_size,
            "batch.grad_accum": self.batch.grad_accum,
            "data.max_length": self.data.max_length,
            "train.epochs": self.train.epochs if self.train.max_steps == 0 else 1,
            "eval.every_steps": self.eval.every_steps,
            "checkpoint.every_steps": self.checkpoint.every_steps,
            "checkpoint.keep_last": self.checkpoint.keep_last,
            "log.every_steps": self.log.every_steps,
        }

    def validate(self) -> None:
        if self.distill is not None:
            raise MobiLlamaError("recipe section 'distill' is for 'mobillama pretrain'; SFT does not distil")
        if self.train.max_steps < 0:
            raise MobiLlamaError(f"recipe key 'train.max_steps' must be >= 0, got {self.train.max_steps}")
        if not 0 <= self.optim.warmup_ratio < 1:
            raise MobiLlamaError(
                f"recipe key 'optim.warmup_ratio' must be in [0, 1), got {self.optim.warmup_ratio}"
            )
        if self.data.format not in FORMATS:
            raise MobiLlamaError(
                f"recipe key 'data.format' must be one of {', '.join(FORMATS)}; got {self.data.format!r}"
            )
        if self.lora is not None:
            lora = self.lora
            if lora.r <= 0 or lora.alpha <= 0:
                raise MobiLlamaError(
                    f"recipe keys 'lora.r' and 'lora.alpha' must be positive, got {lora.r}, {lora.alpha}"
                )
            if not 0 <= lora.dropout < 1:
                raise MobiLlamaError(f"recipe key 'lora.dropout' must be in [0, 1), got {lora.dropout}")
            bad = [t for t in lora.targets if t not in LORA_TARGETS]
            if bad or not lora.targets:
                raise MobiLlamaError(
                    f"recipe key 'lora.targets' entries must be among {', '.join(LORA_TARGETS)}; got {lora.targets}"
                )
        super().validate()

    def validate_model(self) -> None:
        if not self.model.base:
            raise MobiLlamaError("recipe key 'model.base' must name the checkpoint to fine-tune")


def parse_lora_spec(text: str) -> list[str]:
    """``r=16,alpha=32,dropout=0.05,targets=q_proj+v_proj`` -> recipe overrides ``lora.r=16`` ..."""
    overrides = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in ("r", "alpha", "dropout", "targets"):
            raise MobiLlamaError(
                f"--lora item {item!r} must be one of r=INT, alpha=INT, dropout=FLOAT, targets=A+B+..."
            )
        if key == "targets":
            value = "[" + ",".join(v for v in value.split("+") if v) + "]"
        overrides.append(f"lora.{key}={value}")
    return overrides or ["lora={}"]
