"""Tiny fixtures for the vision tests: a random 32-px CLIP tower, the micro decoder, a byte-level tokenizer
with a chat template, and solid-colour shape images drawn in code."""

from __future__ import annotations

import pytest
import torch

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["A chat.", "### Human: What is in the picture?", "### Assistant: a red circle"]
    corpus += [f"a {c} {s}" for c in COLORS for s in SHAPES]
    tok.train_from_iterator(corpus * 10, trainer)
    # Llama's convention: <s> in front of text (what decides BOS for prompts, see mobillama.tokenizer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    fast.chat_template = TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def save_tiny_checkpoints(directory, tokenizer):
    """(MobiLlama-V checkpoint, text-only checkpoint) under ``directory``: the micro decoder (context
    256, random weights) alone and with the tiny 32-px encoder (16 image tokens), both with tokenizer."""
    from mobillama.checkpoint import save_checkpoint
    from mobillama.config import get_preset
    from mobillama.model import MobiLlama
    from mobillama.vision.model import MobiLlamaV, encoder_config_from_preset

    tokenizer.save_pretrained(directory / "tok")
    torch.manual_seed(0)
    config = get_preset("micro").replace(vocab_size=320)
    decoder = MobiLlama(config)
    text = save_checkpoint(decoder, config, directory / "text", tokenizer_dir=directory / "tok")
    vision = MobiLlamaV(decoder, encoder_config_from_preset("tiny")).eval()
    return vision.save_pretrained(directory / "vision", tokenizer_dir=directory / "tok"), text


@pytest.fixture()
def tiny_model():
    from mobillama.config import get_preset
    from mobillama.model import MobiLlama
    from mobillama.vision.model import MobiLlamaV, encoder_config_from_preset

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
