"""Model configuration: one dataclass, the paper's presets, and strict loading from YAML/JSON.

Field names follow Hugging Face Llama's ``config.json`` so a checkpoint's config is readable by both
this package and transformers (``rope_scaling`` too: transformers 4.x's name and shape for the
Llama-family RoPE scaling, :data:`ROPE_SCALING_KEYS`). The one MobiLlama-specific field is ``ffn_sharing``:

- ``"none"``     one FFN per layer (a plain Llama; the paper's baselines and the 1.2B "large base"),
- ``"all"``      one FFN object used by every layer (MobiLlama),
- ``"group:K"``  consecutive groups of K layers share one FFN (for ablations on the degree of sharing),
- ``"dedicated:N+all"`` / ``"dedicated:N+group:K"``  the first N layers keep FFNs of their own and the
  remaining layers share as ``all`` / ``group:K`` says. The first layers of a pretrained model are the
  ones that suffer most when their FFN is merged with others' (docs/sharing.md), so a model made from one
  may keep them dedicated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Collection
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from mobillama.errors import MobiLlamaError

# The dtype names every command and library entry point accepts: short (fp32) and torch's (float32).
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(name: str | torch.dtype, allowed: Collection[torch.dtype] | None = None) -> torch.dtype:
    """A torch dtype from one of :data:`DTYPES`' names (a torch dtype passes through unchanged);
    ``allowed`` narrows the choice for a caller that supports fewer (inference: fp32 and bf16)."""
    names = [n for n, d in DTYPES.items() if allowed is None or d in allowed]
    dtype = name if isinstance(name, torch.dtype) else DTYPES.get(name)
    if dtype is None or (allowed is not None and dtype not in allowed):
        raise MobiLlamaError(f"unknown dtype {name!r}; choose one of: {', '.join(names)}")
    return dtype


# Fields a config.json must state explicitly: a default would silently build the wrong shape.
REQUIRED_IN_CHECKPOINT = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)

# Checkpoint names of the FFN weights: FFN ``g`` (shared by a group of layers) is ``model.ffns.{g}.*``.
FFN_PROJS = ("gate_proj", "up_proj", "down_proj")
FFN_PREFIX = "model.ffns."


def ffn_weight_name(group: int, proj: str) -> str:
    """The checkpoint name of FFN ``group``'s ``proj`` weight (one of :data:`FFN_PROJS`)."""
    return f"{FFN_PREFIX}{group}.{proj}.weight"


# The RoPE scalings the model computes (``rope_scaling: {"rope_type": ..., key: value, ...}``) and the keys
# each one needs beside ``rope_type``, with the meaning transformers gives them (modeling_rope_utils):
# "linear" divides every rotary frequency by ``factor`` (older long-context Llamas); "llama3" (Llama 3.1+)
# divides the low frequencies (wavelength above original_max_position_embeddings / low_freq_factor) by
# ``factor``, keeps the high ones (wavelength below original_max_position_embeddings / high_freq_factor)
# and blends smoothly between. None (the default) is plain RoPE. See :func:`mobillama.model.rope_inv_freq`.
ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_rope_scaling(scaling: Any) -> None:
    """One line naming the key or value at fault unless ``scaling`` is None or a supported RoPE scaling."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise MobiLlamaError(f"config field 'rope_scaling' must be a mapping or null, got {scaling!r}")
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALING_KEYS:
        raise MobiLlamaError(
            f"rope_scaling: rope_type {kind!r} is not supported (choose one of: "
            f"{', '.join(repr(k) for k in ROPE_SCALING_KEYS)}; null for plain RoPE)"
        )
    keys = ROPE_SCALING_KEYS[kind]
    for key in scaling:
        if key != "rope_type" and key not in keys:
            raise MobiLlamaError(
                f"rope_scaling: unknown key {key!r} for rope_type {kind!r} (expected: {', '.join(keys)})"
            )
    for key in keys:
        if key not in scaling:
            raise MobiLlamaError(f"rope_scaling: missing key {key!r} for rope_type {kind!r}")
        value = scaling[key]
        if key == "original_max_position_embeddings":
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise MobiLlamaError(f"rope_scaling: {key!r} must be a positive int, got {value!r}")
        elif not _is_number(value) or value <= 0:
            raise MobiLlamaError(f"rope_scaling: {key!r} must be a positive number, got {value!r}")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise MobiLlamaError(
            f"rope_scaling: 'high_freq_factor' ({scaling['high_freq_factor']!r}) must be greater than "
            f"'low_freq_factor' ({scaling['low_freq_factor']!r})"
        )


@dataclass
class ModelConfig:
    """Everything that determines the model's shape. Defaults are the mobillama-0.5b preset."""

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 22
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None: plain RoPE; else one of ROPE_SCALING_KEYS' types
    tie_word_embeddings: bool = False
    ffn_sharing: str = "all"
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # its own copy: configs made by replace() share nothing
            self.rope_scaling = dict(self.rope_scaling)
        self.validate()

    # --- derived shape -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_dedicated_layers(self) -> int:
        """How many first layers keep an FFN of their own before the sharing starts (``dedicated:N+...``)."""
        head, plus, _ = self.ffn_sharing.partition("+")
        return int(head.split(":", 1)[1]) if plus else 0

    @property
    def ffn_group_size(self) -> int:
        """How many consecutive layers share one FFN (after the dedicated ones)."""
        sharing = self.ffn_sharing.rpartition("+")[2]
        if sharing == "all":
            return self.num_hidden_layers - self.ffn_dedicated_layers
        if sharing == "none":
            return 1
        return int(sharing.split(":", 1)[1])

    @property
    def ffn_groups(self) -> list[range]:
        """The consecutive layers each FFN serves, in FFN order (the last group may be shorter)."""
        first, size, layers = self.ffn_dedicated_layers, self.ffn_group_size, self.num_hidden_layers
        return [range(i, i + 1) for i in range(first)] + [
            range(start, min(start + size, layers)) for start in range(first, layers, size)
        ]

    @property
    def num_ffns(self) -> int:
        rest = self.num_hidden_layers - self.ffn_dedicated_layers
        return self.ffn_dedicated_layers + math.ceil(rest / self.ffn_group_size)

    def ffn_index(self, layer: int) -> int:
        """The FFN that layer ``layer`` uses."""
        first = self.ffn_dedicated_layers
        return layer if layer < first else first + (layer - first) // self.ffn_group_size

    # --- checks ----------------------------------------------------------------------------------
    def validate(self) -> None:
        for f in fields(self):
            if f.name == "rope_scaling":  # a mapping, checked on its own below
                continue
            value = getattr(self, f.name)
            expected = {"int": int, "float": (int, float), "bool": bool, "str": str}[str(f.type)]
            if isinstance(value, bool) and expected is not bool:
                raise MobiLlamaError(f"config field {f.name!r} must be a number, got {value!r}")
            if not isinstance(value, expected):
                raise MobiLlamaError(
                    f"config field {f.name!r} must be {str(f.type)}, got {type(value).__name__} {value!r}"
                )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise MobiLlamaError(f"config field {name!r} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise MobiLlamaError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise MobiLlamaError(f"head size {self.head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MobiLlamaError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise MobiLlamaError("config fields 'rms_norm_eps' and 'rope_theta' must be positive")
        validate_rope_scaling(self.rope_scaling)
        self._validate_ffn_sharing()

    def _validate_ffn_sharing(self) -> None:
        sharing = self.ffn_sharing
        bad = MobiLlamaError(
            "config field 'ffn_sharing' must be 'none', 'all', 'group:K' (K >= 1), 'dedicated:N+all' or "
            f"'dedicated:N+group:K' (N dedicated first layers, 1 <= N < num_hidden_layers), got {sharing!r}"
        )
        dedicated, plus, rest = sharing.rpartition("+")
        if plus:
            head, _, n = dedicated.partition(":")
            if head != "dedicated" or not n.isdigit() or not 1 <= int(n) < self.num_hidden_layers:
                raise bad
            if rest == "none":
                raise bad
        if rest not in ("none", "all"):
            head, _, k = rest.partition(":")
            if head != "group" or not k.isdigit() or int(k) < 1:
                raise bad

    # --- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config", strict: bool = True) -> ModelConfig:
        """Build a config from a mapping.

        ``strict`` (recipes and user YAML) rejects unknown keys: a typo must not pass silently. Without it
        (a checkpoint's config.json, which transformers fills with bookkeeping keys) unknown keys are
        ignored, but the shape fields must all be present.
        """
        if not isinstance(data, dict):
            raise MobiLlamaError(f"{source}: expected a mapping of config fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in data if k not in known)
        if strict and unknown:
            raise MobiLlamaError(f"{source}: unknown config field {unknown[0]!r}")
        if not strict:
            missing = [k for k in REQUIRED_IN_CHECKPOINT if k not in data]
            if missing:
                raise MobiLlamaError(f"{source}: missing config field {missing[0]!r}")
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("eos_token_id"), list):  # HF allows several EOS ids; keep the first
            values["eos_token_id"] = values["eos_token_id"][0] if values["eos_token_id"] else 2
        for k in ("bos_token_id", "eos_token_id"):
            if k in values and values[k] is None:
                del values[k]
        try:
            return cls(**values)
        except MobiLlamaError as e:
            raise MobiLlamaError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read a YAML or JSON file (a checkpoint's config.json included)."""
        path = Path(path)
        if not path.is_file():
            raise MobiLlamaError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
            raise MobiLlamaError(
                f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}"
            ) from None
        is_hf = isinstance(data, dict) and "model_type" in data
        return cls.from_dict(data, source=str(path), strict=not is_hf)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        else:
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# The paper's models plus tiny shapes for CPU tests and demos.
PRESETS: dict[str, ModelConfig] = {
    "mobillama-0.5b": ModelConfig(),
    "mobillama-0.8b": ModelConfig(hidden_size=2560, intermediate_size=10240, max_position_embeddings=2560),
    "large-base-1.2b": ModelConfig(ffn_sharing="none"),
    # The paper's matched-size dedicated-FFN controls; reconstructed (the paper only sketches their shapes).
    "baseline1-0.5b": ModelConfig(
        hidden_size=1024, num_attention_heads=16, num_key_value_heads=16, ffn_sharing="none"
    ),
    "baseline2-0.5b": ModelConfig(num_hidden_layers=8, ffn_sharing="none"),
    # CPU-sized shapes: the same architecture, small enough to train in minutes.
    "tiny": ModelConfig(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
    ),
    "tiny-large-base": ModelConfig(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        ffn_sharing="none",
    ),
    "micro": ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """A copy of a named preset; the error lists the valid names."""
    if name not in PRESETS:
        raise MobiLlamaError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def preset_name(spec: str | Path) -> str | None:
    """``spec`` as a preset name, or None. The one rule every command follows: a preset name counts only
    when no file or directory of that name exists, so a local checkpoint called ``tiny`` is never shadowed."""
    name = str(spec)
    return name if name in PRESETS and not Path(spec).exists() else None


def resolve_config(spec: str | Path) -> ModelConfig:
    """A preset name, a YAML/JSON config file, or a checkpoint directory holding config.json."""
    spec_str = str(spec)
    if preset_name(spec):
        return get_preset(spec_str)
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MobiLlamaError(f"{path} is not a checkpoint directory (no config.json)")
        return ModelConfig.load(path / "config.json")
    if path.is_file():
        return ModelConfig.load(path)
    raise MobiLlamaError(
        f"{spec_str!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file or checkpoint directory"
    )
