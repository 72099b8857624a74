"""MobiLlama-V: a vision encoder bridged into the MobiLlama decoder by a projector (LLaVA-1.5 style).

An image becomes N "image tokens": the encoder's patch features from one layer (penultimate by default,
CLIP's CLS token dropped), mapped by the projector into the decoder's hidden size. In the text, an image
is one placeholder id (:data:`~mobillama.vision.config.IMAGE_TOKEN_ID`); :meth:`MobiLlamaV.forward`
expands each placeholder into that image's N embeddings and stretches the attention mask and labels to
match (image positions never carry a loss). The decoder is the plain :class:`~mobillama.model.MobiLlama`,
fed ``inputs_embeds``.

Labels follow the training loop's convention: ``labels[b, t]`` is the target *at* position t (already
shifted). The label a placeholder carries (the first text token after the image) moves to the image's
last position, so the count of target tokens is the same before and after the expansion.

The pieces live beside this module: the config and the placeholder (:mod:`mobillama.vision.config`),
the encoder, image processor and projector (:mod:`mobillama.vision.encoder`), and the checkpoint
directory format (:mod:`mobillama.vision.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mobillama.checkpoint import TOKENIZER_FILES, load_model
from mobillama.errors import MobiLlamaError
from mobillama.infer.generator import Generator, drain
from mobillama.infer.sampling import SamplingParams
from mobillama.model import MobiLlama
from mobillama.vision.checkpoint import (
    DECODER_SUBDIR,
    read_vision_config,
    read_vision_weights,
    save_vision_checkpoint,
    vision_weight_shapes,
)
from mobillama.vision.config import IMAGE_PLACEHOLDER, VisionConfig
from mobillama.vision.encoder import (
    Projector,
    build_encoder,
    encoder_config_from_preset,
    load_local_encoder,
)

IGNORE_INDEX = -100


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


__all__ = ["IGNORE_INDEX", "MobiLlamaV", "VisionLMOutput", "init_vision_model"]
