"""MobiLlama-V: a vision encoder bridged into the MobiLlama decoder by a projector (LLaVA-1.5 style).

An image becomes N "image tokens": the encoder's patch features from one layer (penultimate by default,
CLIP's CLS token dropped), mapped by the projector into the decoder's hidden size. In the text, an image
is one placeholder id (:data:`IMAGE_TOKEN_ID`, a negative sentinel as in LLaVA, so it can never collide
with a real vocabulary entry and no embedding row has to be added); :meth:`MobiLlamaV.forward` expands
each placeholder into that image's N embeddings and stretches the attention mask and labels to match
(image positions never carry a loss). The decoder is the plain :class:`~mobillama.model.MobiLlama`, fed
``inputs_embeds``.

Labels follow the training loop's convention: ``labels[b, t]`` is the target *at* position t (already
shifted). The label a placeholder carries (the first text token after the image) moves to the image's
last position, so the count of target tokens is the same before and after the expansion.

A checkpoint is one directory (:meth:`save_pretrained` / :meth:`from_pretrained`)::

    vision_config.json         encoder type + its transformers config, feature layer, projector, processor
    vision.safetensors         encoder.* and projector.* weights
    preprocessor_config.json   the image processor (transformers format)
    decoder/                   a normal project checkpoint (loadable by load_model / from_pretrained)
    tokenizer files            copied from the decoder's tokenizer, when there is one

The training loop's step checkpoints of a vision run have the same layout (:class:`VisionModelIO`), with
the loop's optimizer/RNG/data files beside it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mobillama.checkpoint import (
    TOKENIZER_FILES,
    WEIGHTS_NAME,
    atomic_directory,
    copy_tokenizer_files,
    load_checkpoint,
    load_model,
    read_safetensors,
    save_checkpoint,
    write_json,
)
from mobillama.config import ModelConfig
from mobillama.errors import MobiLlamaError
from mobillama.infer.generator import Generator, drain
from mobillama.infer.sampling import SamplingParams
from mobillama.model import MobiLlama

IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
VISION_CONFIG_NAME = "vision_config.json"
VISION_WEIGHTS_NAME = "vision.safetensors"
DECODER_SUBDIR = "decoder"
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


# --------------------------------------------------------------------------------------------------
# Encoder and image processor construction (transformers does the work; nothing is downloaded)
# --------------------------------------------------------------------------------------------------
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


@dataclass
class VisionLMOutput:
    """Logits over the expanded sequence, with the attention mask and labels expanded the same way."""

    logits: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None


class MobiLlamaV(nn.Module):
    """Vision encoder + projector + MobiLlama decoder."""

    def __init__(self, decoder: MobiLlama, vision_config: VisionConfig, encoder: nn.Module | None = None):
        super().__init__()
        self.vision_config = vision_config
        self.encoder = encoder if encoder is not None else build_encoder(vision_config)
        enc_hidden = int(self.encoder.config.hidden_size)
        self.projector = Projector(vision_config.projector, enc_hidden, decoder.config.hidden_size)
        self.decoder = decoder
        # The training loop reads ``unwrap(model).config`` for its step checkpoints: the decoder's config.
        self.config = decoder.config

    @property
    def num_image_tokens(self) -> int:
        return self.vision_config.num_image_tokens

    # ---- image features ---------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, N, decoder hidden]. The encoder runs without autograd when it is frozen."""
        frozen = not any(p.requires_grad for p in self.encoder.parameters())
        dtype = next(self.encoder.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            out = self.encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
            feats = out.hidden_states[self.vision_config.feature_layer]
            if self.vision_config.encoder_type == "clip" and self.vision_config.drop_cls:
                feats = feats[:, 1:]
        return self.projector(feats.to(self.projector.layers[0].weight.dtype))

    # ---- splicing ---------------------------------------------------------------------------------
    def build_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str = "right",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(inputs_embeds, attention_mask, labels) with every placeholder replaced by its image's tokens.

        Images are consumed in order: row 0's placeholders first, left to right. Rows are re-padded to
        the longest expanded row (zeros, mask 0, label IGNORE) on ``padding_side``.
        """
        image_id = self.vision_config.image_token_id
        is_image = input_ids == image_id
        n_images = int(is_image.sum())
        n_given = 0 if pixel_values is None else int(pixel_values.shape[0])
        if n_images != n_given:
            raise MobiLlamaError(
                f"the batch has {n_images} {IMAGE_PLACEHOLDER} placeholder(s) but {n_given} image(s)"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embed = self.decoder.model.embed_tokens
        text = embed(input_ids.masked_fill(is_image, 0))
        if n_images == 0:
            return text, attention_mask, labels
        images = self.encode_images(pixel_values).to(text.dtype)
        N = images.shape[1]
        rows_e, rows_m, rows_l = [], [], []
        k = 0
        for b in range(input_ids.shape[0]):
            spots = is_image[b].nonzero().flatten().tolist()
            pieces_e, pieces_m, pieces_l = [], [], []
            start = 0
            for p in spots:
                pieces_e += [text[b, start:p], images[k]]
                pieces_m += [attention_mask[b, start:p], attention_mask[b, p : p + 1].expand(N)]
                if labels is not None:
                    # The placeholder's target (the token after the image) moves to the image's last slot.
                    img_labels = torch.full((N,), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
                    img_labels[-1] = labels[b, p]
                    pieces_l += [labels[b, start:p], img_labels]
                start, k = p + 1, k + 1
            pieces_e.append(text[b, start:])
            pieces_m.append(attention_mask[b, start:])
            rows_e.append(torch.cat(pieces_e))
            rows_m.append(torch.cat(pieces_m))
            if labels is not None:
                pieces_l.append(labels[b, start:])
                rows_l.append(torch.cat(pieces_l))
        width = max(r.shape[0] for r in rows_e)
        embeds = text.new_zeros(len(rows_e), width, text.shape[-1])
        mask = attention_mask.new_zeros(len(rows_e), width)
        out_labels = None if labels is None else labels.new_full((len(rows_e), width), IGNORE_INDEX)
        for b, e in enumerate(rows_e):
            sl = slice(0, e.shape[0]) if padding_side == "right" else slice(width - e.shape[0], width)
            embeds[b, sl], mask[b, sl] = e, rows_m[b]
            if out_labels is not None:
                out_labels[b, sl] = rows_l[b]
        return embeds, mask, out_labels

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> VisionLMOutput:
        embeds, mask, labels = self.build_inputs(input_ids, pixel_values, attention_mask, labels)
        logits = self.decoder(inputs_embeds=embeds, attention_mask=mask)
        return VisionLMOutput(logits=logits, attention_mask=mask, labels=labels)

    # ---- persistence ------------------------------------------------------------------------------
    def vision_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        state.update({f"projector.{k}": v for k, v in self.projector.state_dict().items()})
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def save_pretrained(
        self, out_dir: str | Path, *, tokenizer_dir: str | Path | None = None, overwrite: bool = False
    ) -> Path:
        """Write the whole model as one checkpoint directory, atomically."""
        return save_vision_checkpoint(
            self.state_dict(),
            self.decoder.config,
            self.vision_config,
            out_dir,
            tokenizer_dir=tokenizer_dir,
            overwrite=overwrite,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> MobiLlamaV:
        """Load a directory written by :meth:`save_pretrained` (eval mode); every file is checked."""
        path = Path(path)
        vision_config = read_vision_config(path)
        decoder = load_model(path / DECODER_SUBDIR)
        model = cls(decoder, vision_config)
        state = read_vision_weights(path, vision_weight_shapes(vision_config, decoder.config.hidden_size))
        model.encoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
        model.projector.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("projector.")})
        return model.to(device).eval()

    # ---- generation -------------------------------------------------------------------------------
    def prompt_embeds(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """(left-padded input embeddings with every placeholder expanded, each row's length): a prompt as
        :meth:`mobillama.infer.generator.Generator.iter_embeds` takes it."""
        with torch.inference_mode():
            embeds, mask, _ = self.build_inputs(input_ids, pixel_values, attention_mask, padding_side="left")
        return embeds, [int(n) for n in mask.sum(dim=1).tolist()]

    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_id: int | Sequence[int] | None = None,
        seed: int | None = None,
    ) -> list[list[int]]:
        """New token ids per row (left-padded rows), through the project's one generation loop
        (:class:`~mobillama.infer.generator.Generator`, greedy at temperature 0). A row ends after
        ``eos_id`` (one id, or several: EOS and a chat template's end-of-turn token), which it includes."""
        stops = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_at_eos=bool(stops),
        )
        embeds, lengths = self.prompt_embeds(input_ids, pixel_values, attention_mask)
        training = self.decoder.training  # the Generator puts the decoder in eval mode; a caller's is kept
        try:
            stream = Generator(self.decoder).iter_embeds(embeds, lengths, params, stop_tokens=stops)
            completions = drain(stream)
        finally:
            self.decoder.train(training)
        return [c.token_ids + ([c.stop_token] if c.stop_token is not None else []) for c in completions]


# --------------------------------------------------------------------------------------------------
# Checkpoint directories: one writer and one set of checks, from a full ``decoder.*/encoder.*/projector.*``
# state dict, shared by save_pretrained/from_pretrained and the training loop's step checkpoints
# --------------------------------------------------------------------------------------------------
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
    for name, shape in expected.items():
        if name not in state:
            raise MobiLlamaError(f"{weights}: missing tensor {name!r}")
        if tuple(state[name].shape) != tuple(shape):
            raise MobiLlamaError(
                f"{weights}: tensor {name!r} has shape {tuple(state[name].shape)}, expected {tuple(shape)}"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise MobiLlamaError(f"{weights}: unexpected tensor {extra[0]!r}")
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


def init_vision_model(
    decoder: str | Path,
    out: str | Path,
    *,
    encoder_dir: str | Path | None = None,
    encoder_config: str = "clip-l-336",
    projector: str = "mlp2x_gelu",
    feature_layer: int = -2,
    tokenizer_dir: str | Path | None = None,
    seed: int = 0,
) -> Path:
    """``mobillama vision init``: decoder checkpoint (or preset) + encoder + fresh projector -> checkpoint."""
    torch.manual_seed(seed)
    dec = load_model(decoder)
    if encoder_dir is not None:
        vision_config, encoder = load_local_encoder(encoder_dir)
    else:
        vision_config, encoder = encoder_config_from_preset(encoder_config), None
    n_layers = int(vision_config.encoder.get("num_hidden_layers", 0))
    if not -n_layers - 1 <= feature_layer <= n_layers:
        raise MobiLlamaError(
            f"--feature-layer {feature_layer} is outside the encoder's 0..{n_layers} hidden states"
        )
    vision_config.projector, vision_config.feature_layer = projector, feature_layer
    VisionConfig.from_dict(vision_config.to_dict())  # validate
    model = MobiLlamaV(dec, vision_config, encoder)
    if tokenizer_dir is None and any((Path(decoder) / f).is_file() for f in TOKENIZER_FILES):
        tokenizer_dir = decoder
    return model.save_pretrained(out, tokenizer_dir=tokenizer_dir)
