"""Tiny fixtures for the vision tests: a random 32-px CLIP tower, the micro decoder, a byte-level tokenizer
with a chat template, and solid-colour shape images drawn in code. The tokenizer and the text checkpoint
come from the shared ``fixtures`` builders."""

from __future__ import annotations

import pytest
import torch

from fixtures import byte_bpe_tokenizer, save_micro_checkpoint

TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% set rest = messages[1:] %}"
    "{% else %}A chat.{% set rest = messages %}{% endif %}"
    "{% for m in rest %}{% if m['role'] == 'user' %}{{ '\\n### Human: ' + m['content'] }}"
    "{% else %}{{ '\\n### Assistant: ' + m['content'] + '</s>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n### Assistant:' }}{% endif %}"
)
COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20)}
SHAPES = ("circle", "square")


def build_tokenizer():
    """The byte-level BPE tokenizer (vocab 320) with the chat template, trained on the shape captions."""
    corpus = ["A chat.", "### Human: What is in the picture?", "### Assistant: a red circle"]
    corpus += [f"a {c} {s}" for c in COLORS for s in SHAPES]
    return byte_bpe_tokenizer(corpus * 10, 320, chat_template=TEMPLATE, pad_token="<unk>")


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def save_tiny_checkpoints(directory, tokenizer):
    """(MobiLlama-V checkpoint, text-only checkpoint) under ``directory``: the micro decoder (context
    256, random weights) alone and with the tiny 32-px encoder (16 image tokens), both with tokenizer; the
    vision model wraps the text checkpoint loaded back, so both hold the same decoder weights."""
    from mobillama.checkpoint import load_model
    from mobillama.vision.encoder import encoder_config_from_preset
    from mobillama.vision.model import MobiLlamaV

    tokenizer.save_pretrained(directory / "tok")
    text = save_micro_checkpoint(directory / "text", directory / "tok", vocab_size=320)
    vision = MobiLlamaV(load_model(text), encoder_config_from_preset("tiny")).eval()
    return vision.save_pretrained(directory / "vision", tokenizer_dir=directory / "tok"), text


@pytest.fixture()
def tiny_model():
    from mobillama.config import get_preset
    from mobillama.model import MobiLlama
    from mobillama.vision.encoder import encoder_config_from_preset
    from mobillama.vision.model import MobiLlamaV

    torch.manual_seed(0)
    decoder = MobiLlama(get_preset("micro").replace(vocab_size=320))
    return MobiLlamaV(decoder, encoder_config_from_preset("tiny")).eval()


def draw_shape(color: str, shape: str, size: int = 32, mode: str = "RGB"):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    box = (6, 6, size - 6, size - 6)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLORS[color])
    return img.convert(mode)


@pytest.fixture()
def shapes_dir(tmp_path):
    """Caption pairs: one image per colour x shape, named by its caption (JSONL next to the images)."""
    import json

    lines = []
    for c in COLORS:
        for s in SHAPES:
            draw_shape(c, s).save(tmp_path / f"{c}_{s}.png")
            lines.append(json.dumps({"image": f"{c}_{s}.png", "caption": f"a {c} {s}"}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path
