"""MobiLlama-V checkpoint directories: one writer and one set of checks, from a full
``decoder.*/encoder.*/projector.*`` state dict, shared by ``MobiLlamaV.save_pretrained`` /
``from_pretrained`` (:mod:`mobillama.vision.model`) and the training loop's step checkpoints
(:class:`VisionModelIO`).

A checkpoint is one directory::

    vision_config.json         encoder type + its transformers config, feature layer, projector, processor
    vision.safetensors         encoder.* and projector.* weights
    preprocessor_config.json   the image processor (transformers format)
    decoder/                   a normal project checkpoint (loadable by load_model / from_pretrained)
    tokenizer files            copied from the decoder's tokenizer, when there is one

The training loop's step checkpoints of a vision run have the same layout, with the loop's
optimizer/RNG/data files beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from mobillama.checkpoint import (
    WEIGHTS_NAME,
    atomic_directory,
    check_state_dict,
    copy_tokenizer_files,
    load_checkpoint,
    read_safetensors,
    save_checkpoint,
    write_json,
)
from mobillama.config import ModelConfig
from mobillama.errors import MobiLlamaError
from mobillama.vision.config import VisionConfig
from mobillama.vision.encoder import Projector, build_encoder, build_image_processor

VISION_CONFIG_NAME = "vision_config.json"
VISION_WEIGHTS_NAME = "vision.safetensors"
DECODER_SUBDIR = "decoder"


def save_vision_checkpoint(
    state: dict[str, torch.Tensor],
    decoder_config: ModelConfig,
    vision_config: VisionConfig,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a MobiLlama-V directory (see the module docstring) atomically from a full state dict."""
    decoder_state = {k[len("decoder.") :]: v for k, v in state.items() if k.startswith("decoder.")}
    vision_state = {
        k: v.detach().contiguous().cpu() for k, v in state.items() if k.startswith(("encoder.", "projector."))
    }
    stray = sorted(set(state) - {f"decoder.{k}" for k in decoder_state} - set(vision_state))
    if stray:
        raise MobiLlamaError(f"cannot save {out_dir}: tensor {stray[0]!r} is not part of a MobiLlama-V model")
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_checkpoint(decoder_state, decoder_config, tmp / DECODER_SUBDIR, tokenizer_dir=tokenizer_dir)
        save_file(vision_state, str(tmp / VISION_WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(tmp / VISION_CONFIG_NAME, vision_config.to_dict())
        build_image_processor(vision_config).save_pretrained(str(tmp))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return out_dir


def read_vision_config(path: str | Path) -> VisionConfig:
    """The vision_config.json of a MobiLlama-V directory (one-line errors for a missing or bad file)."""
    path = Path(path)
    cfg_file = path / VISION_CONFIG_NAME
    if not cfg_file.is_file():
        raise MobiLlamaError(f"{path} is not a MobiLlama-V checkpoint (no {VISION_CONFIG_NAME})")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MobiLlamaError(f"{cfg_file}: not valid JSON ({e})") from None
    return VisionConfig.from_dict(raw, source=str(cfg_file))


def vision_weight_shapes(vision_config: VisionConfig, decoder_hidden: int) -> dict[str, torch.Size]:
    """Every ``encoder.*``/``projector.*`` tensor the config implies, with its shape (meta device: free)."""
    with torch.device("meta"):
        encoder = build_encoder(vision_config)
        projector = Projector(vision_config.projector, int(encoder.config.hidden_size), decoder_hidden)
    shapes = {f"encoder.{k}": v.shape for k, v in encoder.state_dict().items()}
    shapes.update({f"projector.{k}": v.shape for k, v in projector.state_dict().items()})
    return shapes


def read_vision_weights(path: str | Path, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """vision.safetensors, checked name by name and shape by shape against ``expected``."""
    weights = Path(path) / VISION_WEIGHTS_NAME
    if not weights.is_file():
        raise MobiLlamaError(f"{path}: no {VISION_WEIGHTS_NAME}")
    state = read_safetensors(weights)
    check_state_dict(state, expected, str(weights))
    return state


def read_vision_checkpoint(path: str | Path) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """(vision config, full ``decoder.*/encoder.*/projector.*`` state dict, tied weights included) of a
    MobiLlama-V directory, with the same checks as :meth:`MobiLlamaV.from_pretrained`."""
    path = Path(path)
    vision_config = read_vision_config(path)
    config, decoder_state = load_checkpoint(path / DECODER_SUBDIR)
    if config.tie_word_embeddings:
        decoder_state["lm_head.weight"] = decoder_state["model.embed_tokens.weight"]
    state = read_vision_weights(path, vision_weight_shapes(vision_config, config.hidden_size))
    state.update({f"decoder.{k}": v for k, v in decoder_state.items()})
    return vision_config, state


@dataclass
class VisionModelIO:
    """Step checkpoints of a MobiLlama-V run as MobiLlama-V directories, so ``from_pretrained`` loads any
    of them (the training loop's ``model_io`` hook, :class:`mobillama.train.state.ModelIO`)."""

    vision_config: VisionConfig
    weights_files: tuple[str, ...] = (f"{DECODER_SUBDIR}/{WEIGHTS_NAME}", VISION_WEIGHTS_NAME)

    def write(
        self,
        state: dict[str, torch.Tensor],
        config: ModelConfig,
        directory: Path,
        tokenizer_dir: str | Path | None = None,
    ) -> None:
        save_vision_checkpoint(
            state, config, self.vision_config, directory, tokenizer_dir=tokenizer_dir, overwrite=True
        )

    def read(self, directory: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
        return read_vision_checkpoint(directory)[1]


__all__ = [
    "DECODER_SUBDIR",
    "VISION_CONFIG_NAME",
    "VISION_WEIGHTS_NAME",
    "VisionModelIO",
    "read_vision_checkpoint",
    "read_vision_config",
    "read_vision_weights",
    "save_vision_checkpoint",
    "vision_weight_shapes",
]
