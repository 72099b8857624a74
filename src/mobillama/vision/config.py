"""What a MobiLlama-V checkpoint records besides its decoder (``vision_config.json``: :class:`VisionConfig`),
the named encoder shapes, and how an image appears in the text.

In the text an image is one placeholder: the literal :data:`IMAGE_PLACEHOLDER` before tokenization and
the id :data:`IMAGE_TOKEN_ID` after it, a negative sentinel as in LLaVA, so it can never collide with a
real vocabulary entry and no embedding row has to be added. Kept apart from the model, so the data
pipeline and the server use these without importing MobiLlama-V (and, through it, the generation loop).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mobillama.errors import MobiLlamaError

IMAGE_TOKEN_ID = -200
IMAGE_PLACEHOLDER = "<image>"
FORMAT_VERSION = 1

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Encoder shapes buildable without any download (random weights): "clip-l-336" is LLaVA-1.5's encoder.
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    ),
    "small-64": dict(
        image_size=64,
        patch_size=8,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        projection_dim=128,
    ),
    "clip-l-336": dict(
        image_size=336,
        patch_size=14,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        projection_dim=768,
        hidden_act="quick_gelu",
    ),
}
PROJECTORS = ("mlp2x_gelu", "linear")


@dataclass
class VisionConfig:
    """Everything besides the decoder that a MobiLlama-V checkpoint needs to be rebuilt exactly."""

    encoder_type: str = "clip"  # "clip" or "siglip"
    encoder: dict[str, Any] = field(default_factory=dict)  # the transformers vision config (to_dict())
    feature_layer: int = -2  # index into the encoder's hidden_states (-2 = penultimate)
    drop_cls: bool = True  # CLIP prepends a CLS token; SigLIP has none
    projector: str = "mlp2x_gelu"
    image_token_id: int = IMAGE_TOKEN_ID
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.encoder_type not in ("clip", "siglip"):
            raise MobiLlamaError(
                f"vision config: encoder_type must be clip or siglip, got {self.encoder_type!r}"
            )
        if self.projector not in PROJECTORS:
            raise MobiLlamaError(
                f"vision config: projector must be one of {', '.join(PROJECTORS)}, got {self.projector!r}"
            )
        if self.image_token_id >= 0:
            raise MobiLlamaError(
                f"vision config: image_token_id must be negative (a sentinel), got {self.image_token_id}"
            )

    @property
    def image_size(self) -> int:
        return int(self.encoder.get("image_size", 224))

    @property
    def num_image_tokens(self) -> int:
        """Image tokens one image expands into: patches, plus CLS when it is kept."""
        patches = (self.image_size // int(self.encoder.get("patch_size", 16))) ** 2
        return patches + (1 if self.encoder_type == "clip" and not self.drop_cls else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "vision config") -> VisionConfig:
        if not isinstance(data, dict):
            raise MobiLlamaError(f"{source}: expected a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise MobiLlamaError(f"{source}: unknown key {unknown[0]!r}")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise MobiLlamaError(f"{source}: format_version {data['format_version']} is newer than this code")
        return cls(**data)


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ENCODER_PRESETS",
    "FORMAT_VERSION",
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN_ID",
    "PROJECTORS",
    "VisionConfig",
]
