"""The image side of MobiLlama-V, built from a :class:`~mobillama.vision.config.VisionConfig`: the vision
tower (a transformers CLIP or SigLIP model, random of a named shape or loaded from a local directory;
nothing is ever downloaded), its image processor, and the projector into the decoder's hidden size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobillama.errors import MobiLlamaError
from mobillama.vision.config import CLIP_MEAN, CLIP_STD, ENCODER_PRESETS, VisionConfig


def build_encoder(vision_config: VisionConfig) -> nn.Module:
    """A randomly initialised vision tower of the configured shape."""
    if vision_config.encoder_type == "siglip":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        return SiglipVisionModel(SiglipVisionConfig(**_encoder_kwargs(vision_config.encoder)))
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(**_encoder_kwargs(vision_config.encoder)))


def _encoder_kwargs(d: dict[str, Any]) -> dict[str, Any]:
    drop = {"model_type", "transformers_version", "architectures", "_name_or_path"}
    return {k: v for k, v in d.items() if k not in drop}


def encoder_config_from_preset(name: str) -> VisionConfig:
    if name not in ENCODER_PRESETS:
        raise MobiLlamaError(f"unknown encoder config {name!r} (known: {', '.join(ENCODER_PRESETS)})")
    from transformers import CLIPVisionConfig

    return VisionConfig(encoder_type="clip", encoder=CLIPVisionConfig(**ENCODER_PRESETS[name]).to_dict())


def load_local_encoder(path: str | Path) -> tuple[VisionConfig, nn.Module]:
    """A pretrained CLIP or SigLIP vision tower from a local directory (a full CLIP/SigLIP checkpoint or a
    vision-only one); ``local_files_only`` so a missing file is an error, never a hub download."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MobiLlamaError(f"encoder directory {path} has no config.json")
    try:
        model_type = json.loads(cfg_file.read_text(encoding="utf-8")).get("model_type", "")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MobiLlamaError(f"{cfg_file}: not valid JSON ({e})") from None
    if model_type in ("clip", "clip_vision_model"):
        from transformers import CLIPVisionModel as cls

        kind = "clip"
    elif model_type in ("siglip", "siglip_vision_model"):
        from transformers import SiglipVisionModel as cls

        kind = "siglip"
    else:
        raise MobiLlamaError(f"{cfg_file}: model_type {model_type!r} is not a CLIP or SigLIP model")
    from transformers.utils import logging as hf_logging

    # transformers prints a load report listing every text-tower tensor of a full CLIP checkpoint as
    # "unexpected"; that is expected here, so it is silenced and the report is checked instead: a
    # vision tensor missing from the files would otherwise be left at its random initial value
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        encoder, info = cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise MobiLlamaError(f"cannot load the encoder from {path}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise MobiLlamaError(
            f"{path}: the checkpoint lacks vision tensor {missing[0]!r} ({len(missing)} missing)"
        )
    mean, std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else ([0.5] * 3, [0.5] * 3)
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text(encoding="utf-8"))
        mean, std = p.get("image_mean", mean), p.get("image_std", std)
    vc = VisionConfig(
        encoder_type=kind,
        encoder=encoder.config.to_dict(),
        drop_cls=kind == "clip",
        image_mean=list(mean),
        image_std=list(std),
    )
    return vc, encoder


def build_image_processor(vision_config: VisionConfig):
    """The encoder's image processor, built from the config: resize the short side, center-crop to the
    square input size, rescale to [0, 1], normalise with the encoder's mean/std."""
    from transformers import CLIPImageProcessor

    s = vision_config.image_size
    return CLIPImageProcessor(
        size={"shortest_edge": s},
        crop_size={"height": s, "width": s},
        image_mean=vision_config.image_mean,
        image_std=vision_config.image_std,
        do_convert_rgb=True,
    )


class Projector(nn.Module):
    """Encoder features -> decoder hidden size: LLaVA-1.5's 2-layer MLP with GELU, or one linear map."""

    def __init__(self, kind: str, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if kind == "linear":
            self.layers = nn.Sequential(nn.Linear(in_dim, out_dim))
        else:
            self.layers = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


__all__ = [
    "Projector",
    "build_encoder",
    "build_image_processor",
    "encoder_config_from_preset",
    "load_local_encoder",
]
