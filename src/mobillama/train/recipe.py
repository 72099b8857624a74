"""Training recipes: nested dataclasses read from YAML with strict validation.

A recipe states everything a run depends on (model, data, optimizer, schedule, batch, precision,
checkpointing, logging), so a run directory's copy of it is enough to reproduce the run. Loading is
strict on purpose: an unknown key (a typo such as ``optim.weight_decy``) or a wrong type names the key
and fails, instead of silently training with a default.

Shipped recipes live in ``mobillama/recipes/*.yaml``; ``load_recipe("tiny-cpu")`` finds them by name.
Command-line overrides use dotted keys (``optim.lr=1e-3``) and the same validation.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mobillama.errors import MobiLlamaError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

# Parameter groups that can be excluded from weight decay (``optim.no_decay``).
NO_DECAY_CHOICES = ("norms", "embeddings", "lm_head")
TRAIN_ONLY_CHOICES = ("all", "ffn")


@dataclass
class ModelSection:
    preset: str = "tiny"
    # ModelConfig fields that differ from the preset (validated by ModelConfig itself).
    overrides: dict[str, Any] = field(default_factory=dict)
    # A checkpoint directory whose weights initialise the model (continued training); fresh optimizer.
    init_from: str | None = None
    gradient_checkpointing: bool = False
    compile: bool = False
    # Which parameters train: "all", or "ffn" (the FFNs only; attention, norms, embeddings frozen), e.g. to
    # heal a model merged by ``mobillama share`` without touching what was copied as it was.
    train_only: str = "all"


@dataclass
class DataSection:
    # A token-shard directory written by ``mobillama data prepare`` (manifest.json + *.bin).
    path: str = "runs/data/stdlib"
    train_split: str = "train"
    val_split: str = "val"
    # Check every shard's sha256 against the manifest before training (reads the corpus once).
    verify_hashes: bool = True
    # Seed of the per-epoch sample permutation (independent of the model's init seed).
    seed: int = 1234


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr: float = 3e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Which parameters get no weight decay: any of "norms" (RMSNorm scales), "embeddings", "lm_head".
    no_decay: list[str] = field(default_factory=lambda: ["norms"])
    grad_clip: float = 1.0
    warmup_steps: int = 2000
    # "cosine": linear warmup to lr, cosine decay to min_lr at train.max_steps. "constant": warmup then flat.
    schedule: str = "cosine"


@dataclass
class BatchSection:
    # Tokens per optimizer step over all ranks; must be micro_batch_size * seq_len * world * accumulation.
    global_batch_tokens: int = 8192
    # Samples per forward pass on one rank.
    micro_batch_size: int = 8


@dataclass
class TrainSection:
    max_steps: int = 1000
    seed: int = 0
    # "fp32", or "bf16" (autocast; master weights, optimizer state and loss stay fp32).
    precision: str = "fp32"
    # "auto" (cuda if available), "cpu", "cuda".
    device: str = "auto"
    # "auto" (ddp when launched by torchrun with >1 process), "none", "ddp", "fsdp2".
    strategy: str = "auto"
    # Peak FLOP/s of one device for MFU (e.g. 312e12 for an A100 in bf16); 0 = do not report MFU.
    peak_flops: float = 0.0


@dataclass
class EvalSection:
    every_steps: int = 100
    # Validation batches (of micro_batch_size samples per rank) per evaluation; 0 = the whole split.
    max_batches: int = 20


@dataclass
class CheckpointSection:
    every_steps: int = 500
    # Retention: the last ``keep_last`` checkpoints, plus those whose step is a multiple of
    # ``keep_every_steps`` (0 = none kept forever), plus the final one.
    keep_last: int = 2
    keep_every_steps: int = 0


@dataclass
class LogSection:
    every_steps: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass
class DistillSection:
    """Knowledge distillation from a teacher checkpoint (healing a ``mobillama share`` result from its source).

    The loss per target token is ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``, where
    ``_T`` are the softmaxes at temperature T; the T^2 keeps the KL's gradient scale independent of T
    (Hinton et al., 2015). Validation loss stays the plain next-token loss, comparable across runs.
    """

    # A checkpoint directory (the same vocabulary as the student); its logits are computed per micro-batch.
    teacher: str = ""
    temperature: float = 1.0
    alpha: float = 0.5


@dataclass
class Recipe:
    name: str = "custom"
    # Run directory; defaults to runs/<name>.
    out_dir: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    batch: BatchSection = field(default_factory=BatchSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    distill: DistillSection | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")

    def positive_values(self) -> dict[str, Any]:
        """Keys that must be > 0 (a hook: recipe variants with other sections list their own)."""
        return {
            "batch.global_batch_tokens": self.batch.global_batch_tokens,
            "batch.micro_batch_size": self.batch.micro_batch_size,
            "train.max_steps": self.train.max_steps,
            "eval.every_steps": self.eval.every_steps,
            "checkpoint.every_steps": self.checkpoint.every_steps,
            "checkpoint.keep_last": self.checkpoint.keep_last,
            "log.every_steps": self.log.every_steps,
        }

    def validate(self) -> None:
        """Value checks that types alone cannot express; each error names the key."""
        for key, value in self.positive_values().items():
            if value <= 0:
                raise MobiLlamaError(f"recipe key {key!r} must be positive, got {value}")
        non_negative = {
            "optim.lr": self.optim.lr,
            "optim.min_lr": self.optim.min_lr,
            "optim.weight_decay": self.optim.weight_decay,
            "optim.grad_clip": self.optim.grad_clip,
            "optim.warmup_steps": self.optim.warmup_steps,
            "train.peak_flops": self.train.peak_flops,
            "eval.max_batches": self.eval.max_batches,
            "checkpoint.keep_every_steps": self.checkpoint.keep_every_steps,
        }
        for key, value in non_negative.items():
            if value < 0:
                raise MobiLlamaError(f"recipe key {key!r} must be >= 0, got {value}")
        if self.optim.min_lr > self.optim.lr:
            raise MobiLlamaError(f"recipe key 'optim.min_lr' ({self.optim.min_lr}) exceeds 'optim.lr'")
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            raise MobiLlamaError(
                f"recipe key 'optim.betas' must be two numbers in [0, 1), got {self.optim.betas}"
            )
        choices = {
            "optim.schedule": (self.optim.schedule, ("cosine", "constant")),
            "train.precision": (self.train.precision, ("fp32", "bf16")),
            "train.device": (self.train.device, ("auto", "cpu", "cuda")),
            "train.strategy": (self.train.strategy, ("auto", "none", "ddp", "fsdp2")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise MobiLlamaError(f"recipe key {key!r} must be one of {', '.join(allowed)}; got {value!r}")
        for item in self.optim.no_decay:
            if item not in NO_DECAY_CHOICES:
                raise MobiLlamaError(
                    f"recipe key 'optim.no_decay' entries must be among {', '.join(NO_DECAY_CHOICES)}; got {item!r}"
                )
        self.validate_distill()
        self.validate_model()

    def validate_distill(self) -> None:
        if self.distill is None:
            return
        if not self.distill.teacher:
            raise MobiLlamaError("recipe key 'distill.teacher' must name a checkpoint directory")
        if self.distill.temperature <= 0:
            raise MobiLlamaError(
                f"recipe key 'distill.temperature' must be positive, got {self.distill.temperature}"
            )
        if not 0 <= self.distill.alpha <= 1:
            raise MobiLlamaError(f"recipe key 'distill.alpha' must be in [0, 1], got {self.distill.alpha}")

    def validate_model(self) -> None:
        """The model section: a known preset whose overrides make a valid ModelConfig."""
        from mobillama.config import get_preset

        get_preset(self.model.preset).replace()  # unknown preset -> error listing the names
        train_only = getattr(self.model, "train_only", "all")
        if train_only not in TRAIN_ONLY_CHOICES:
            raise MobiLlamaError(
                f"recipe key 'model.train_only' must be one of {', '.join(TRAIN_ONLY_CHOICES)}; got {train_only!r}"
            )
        self.model_config()

    def model_config(self):
        """The ModelConfig this recipe trains: the preset plus ``model.overrides``."""
        from mobillama.config import ModelConfig, get_preset

        base = get_preset(self.model.preset).to_dict()
        base.update(self.model.overrides)
        return ModelConfig.from_dict(base, source="recipe key 'model.overrides'", strict=True)

    def init_model_config(self, init_from: str | Path):
        """The ModelConfig when training continues from a checkpoint (``--init-from``/``model.init_from``):
        the checkpoint's own config.json, so its shape never has to be copied into the recipe.

        ``model.preset`` is not used then. A ``model.overrides`` field that contradicts the checkpoint is an
        error naming the field (weights of one shape cannot train as another); one that agrees is fine.
        """
        from mobillama.checkpoint import CONFIG_NAME
        from mobillama.config import ModelConfig

        path = Path(init_from)
        if not path.exists():
            raise MobiLlamaError(f"--init-from: checkpoint not found: {path}")
        if not (path / CONFIG_NAME).is_file():
            raise MobiLlamaError(f"--init-from {path} is not a checkpoint directory (no {CONFIG_NAME})")
        if (path / "quantization.json").is_file():
            raise MobiLlamaError(
                f"--init-from {path} is a quantized checkpoint; training needs the full-precision one"
            )
        config = ModelConfig.load(path / CONFIG_NAME)
        stated = config.to_dict()
        for key, value in self.model.overrides.items():
            if stated[key] != value:
                raise MobiLlamaError(
                    f"recipe key 'model.overrides.{key}' is {value!r} but --init-from {path} has {key} "
                    f"{stated[key]!r}: the model's shape comes from the checkpoint (drop the override)"
                )
        return config


# --- strict (de)serialisation ---------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        return _from_mapping(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise MobiLlamaError(f"recipe key {key!r} must be a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MobiLlamaError(
                f"recipe key {key!r} must be a mapping, got {type(value).__name__} {value!r}"
            )
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (isinstance(value, bool) and tp is not bool):
        raise MobiLlamaError(
            f"recipe key {key!r} must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    return value


def _from_mapping(cls: type, data: Any, prefix: str) -> Any:
    where = f"recipe section {prefix!r}" if prefix else "recipe"
    if not isinstance(data, dict):
        raise MobiLlamaError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise MobiLlamaError(
                f"unknown recipe key {full!r} (known in {where}: {', '.join(sorted(known))})"
            )
    values = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**values)


def recipe_from_dict(data: Any, source: str = "recipe", cls: type[Recipe] = Recipe) -> Recipe:
    """``cls`` picks the recipe kind (``Recipe`` for pre-training, a subclass such as the SFT recipe)."""
    try:
        recipe = _from_mapping(cls, data, "")
        recipe.validate()
    except MobiLlamaError as e:
        raise MobiLlamaError(f"{source}: {e}") from None
    return recipe


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=1e-3`` (leading dashes allowed) -> (["optim", "lr"], 0.001); values are YAML scalars."""
    body = text.lstrip("-")
    key, sep, raw = body.partition("=")
    if not sep or not key:
        raise MobiLlamaError(f"override {text!r} must look like --section.key=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MobiLlamaError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def load_recipe(spec: str | Path, overrides: list[str] | None = None, cls: type[Recipe] = Recipe) -> Recipe:
    """A shipped recipe name or a YAML file, with dotted ``key=value`` overrides applied."""
    spec_str = str(spec)
    path = Path(spec)
    if not path.is_file() and (RECIPES_DIR / f"{spec_str}.yaml").is_file():
        path = RECIPES_DIR / f"{spec_str}.yaml"
    if not path.is_file():
        raise MobiLlamaError(
            f"recipe {spec_str!r} is neither a file nor a shipped recipe ({', '.join(available_recipes())})"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise MobiLlamaError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        raise MobiLlamaError(f"{path}: empty recipe")
    if not isinstance(data, dict):
        raise MobiLlamaError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return recipe_from_dict(apply_overrides(data, list(overrides or [])), source=str(path), cls=cls)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
