"""Vision data: caption pairs (stage 1) and LLaVA conversations (stage 2), images, and training batches.

Formats (paths inside a file are relative to that file's directory unless absolute):

- Caption pairs, JSONL: ``{"image": "img/cat.png", "caption": "A cat."}`` per line.
- LLaVA conversations, a JSON array or JSONL: ``{"id": "...", "image": "img/cat.png",
  "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "..."}]}``.
  ``image`` may also be a list; the number of ``<image>`` placeholders must equal the number of images.

Token rows use the model's placeholder id (:data:`IMAGE_TOKEN_ID`) for each image. Stage-1 rows are
``<s> <image> caption </s>`` with the loss on the caption and ``</s>`` (LLaVA's "plain" pretraining
format); stage-2 rows are the chat template's rendering with assistant-only labels, found with the SFT
code's :func:`mobillama.sft.masking.assistant_spans`. Batches hand the training loop shifted labels.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mobillama.errors import MobiLlamaError
from mobillama.sft.masking import IGNORE_INDEX, assistant_spans
from mobillama.tokenizer import bos_prefix
from mobillama.vision.config import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID

# Modes Pillow converts to RGB without losing meaning (alpha is composited onto white).
CONVERTIBLE_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "La")
# Refused: 16/32-bit integer and float images (depth maps, scientific data) would be clipped or rescaled
# arbitrarily by a conversion; the user should map them to 8-bit deliberately.
REFUSED_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F", "HSV", "LAB")


def load_image(path: str | Path, sample: str):
    """An RGB Pillow image, or a one-line error naming the sample and the file."""
    path = Path(path)
    if not path.is_file():
        raise MobiLlamaError(f"sample {sample}: image file not found: {path}")
    return decode_image(path, f"sample {sample}: ", f"image {path}")


def read_image_file(path: str | Path):
    """An RGB Pillow image from a user-given file (chat ``--image``, the server's local paths)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MobiLlamaError(f"image file not found: {path}")
    return decode_image(path, "", f"image {path}")


def decode_image(source: str | Path | bytes, prefix: str, what: str, max_pixels: int | None = None):
    """An RGB Pillow image from a file or from bytes (the server's data URLs); errors are one line,
    ``prefix`` + a sentence about ``what`` (e.g. "image /x.png"). Alpha is composited onto white.
    ``max_pixels`` refuses an image by its header, before decoding it (a small file can be a huge image)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise MobiLlamaError(
                    f"{prefix}{what} is {img.width}x{img.height} pixels, more than the limit of {max_pixels}"
                )
            img.load()
            image = img.copy()
    except UnidentifiedImageError:
        raise MobiLlamaError(f"{prefix}cannot read {what} (not a recognised image format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MobiLlamaError(f"{prefix}cannot read {what} ({type(e).__name__}: {e})") from None
    if image.mode not in CONVERTIBLE_MODES:
        raise MobiLlamaError(
            f"{prefix}{what} has unsupported mode {image.mode!r} "
            f"(accepted: {', '.join(CONVERTIBLE_MODES)}; convert it to 8-bit RGB first)"
        )
    if image.mode in ("RGBA", "LA", "PA", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass
class VisionExample:
    """One token row (placeholders included) with labels aligned to the inputs, and its image files."""

    name: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss; aligned with input_ids (not shifted)
    images: list[Path]


def _hf(tokenizer):
    return getattr(tokenizer, "hf", tokenizer)


def _read_records(path: Path) -> list[tuple[int, Any]]:
    if not path.is_file():
        raise MobiLlamaError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MobiLlamaError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise MobiLlamaError(f"{path}: not valid JSON ({e})") from None
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise MobiLlamaError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
    if not out:
        raise MobiLlamaError(f"{path}: no records (the file is empty)")
    return out


def _image_list(value: Any, base: Path, sample: str) -> list[Path]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise MobiLlamaError(f"sample {sample}: 'image' must be a path or a list of paths, got {value!r}")
    return [Path(v) if Path(v).is_absolute() else base / v for v in values]


def caption_example(tokenizer, name: str, image: Path, caption: str, max_length: int) -> VisionExample:
    """``<s> <image> caption </s>``, loss on the caption and ``</s>`` (``<s>`` only where the tokenizer puts
    BOS in front of text: a SmolLM2-style tokenizer gets ``<image> caption <|im_end|>``)."""
    hf = _hf(tokenizer)
    ids = hf.encode(caption.strip(), add_special_tokens=False)
    head = bos_prefix(tokenizer, "") + [IMAGE_TOKEN_ID]
    tail = [hf.eos_token_id] if hf.eos_token_id is not None else []
    body = (ids + tail)[: max(0, max_length - len(head))]
    if not body:
        raise MobiLlamaError(f"sample {name}: max_length {max_length} leaves no room for the caption")
    return VisionExample(name, head + body, [IGNORE_INDEX] * len(head) + body, [image])


def tokenize_with_placeholders(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` with each ``<image>`` as one :data:`IMAGE_TOKEN_ID`, and character offsets.

    Each piece between placeholders is tokenized on its own (as LLaVA does), so an ``<image>`` never
    merges with neighbouring characters into one token.
    """
    hf = _hf(tokenizer)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    at = 0
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            ids.append(IMAGE_TOKEN_ID)
            offsets.append((at, at + len(IMAGE_PLACEHOLDER)))
            at += len(IMAGE_PLACEHOLDER)
        if piece:
            enc = hf(piece, add_special_tokens=False, return_offsets_mapping=True)
            ids += enc["input_ids"]
            offsets += [(at + s, at + e) for s, e in enc["offset_mapping"]]
        at += len(piece)
    return ids, offsets


def conversation_example(
    tokenizer, name: str, conversation: list[dict[str, str]], images: list[Path], max_length: int
) -> VisionExample | None:
    """The chat template's rendering with each ``<image>`` as one placeholder id; assistant-only labels.

    Returns None when truncation to
    ``max_length`` text tokens would cut an image or leave no assistant token.
    """
    text, spans = assistant_spans(tokenizer, conversation)
    ids, offsets = tokenize_with_placeholders(tokenizer, text)
    labels = [
        token
        if token != IMAGE_TOKEN_ID and any(s < s_end and e > s_start for s_start, s_end in spans)
        else IGNORE_INDEX
        for token, (s, e) in zip(ids, offsets)
    ]
    bos = bos_prefix(tokenizer, text)  # the tokenizer's rule; never a second BOS after the template's
    ids, labels = [*bos, *ids], [IGNORE_INDEX] * len(bos) + labels
    ids, labels = ids[:max_length], labels[:max_length]
    if ids.count(IMAGE_TOKEN_ID) != len(images):
        return None
    last = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=None)
    if last is None:
        return None
    return VisionExample(name, ids[: last + 1], labels[: last + 1], images)


def load_caption_examples(path: str | Path, tokenizer, max_length: int = 128) -> list[VisionExample]:
    """Caption pairs from JSONL; every record must have a non-empty ``image`` and ``caption``."""
    return [
        caption_example(tokenizer, name, image, caption, max_length)
        for name, image, caption in read_caption_pairs(path)
    ]


def read_caption_pairs(path: str | Path) -> list[tuple[str, Path, str]]:
    """``(sample name, image path, caption)`` of every record of a caption JSONL, validated (the errors
    name the sample); shared by the decoder's caption examples and the encoder's contrastive pairs."""
    path = Path(path)
    pairs = []
    for number, record in _read_records(path):
        name = f"{path.name}:{number}"
        if not isinstance(record, dict):
            raise MobiLlamaError(f"sample {name}: expected a JSON object")
        caption = record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise MobiLlamaError(f"sample {name}: 'caption' must be a non-empty string")
        if IMAGE_PLACEHOLDER in caption:
            raise MobiLlamaError(f"sample {name}: a caption must not contain {IMAGE_PLACEHOLDER}")
        images = _image_list(record.get("image"), path.parent, name)
        if len(images) != 1:
            raise MobiLlamaError(f"sample {name}: a caption pair needs exactly one 'image'")
        pairs.append((name, images[0], caption))
    return pairs


def load_llava_examples(
    path: str | Path, tokenizer, max_length: int = 512
) -> tuple[list[VisionExample], dict[str, int]]:
    """LLaVA records -> examples and a count of those skipped because truncation cut them."""
    from mobillama.sft.formats import normalise

    path = Path(path)
    examples, skipped = [], {"truncated": 0}
    for number, record in _read_records(path):
        name = f"{path.name}:{number}"
        if isinstance(record, dict) and isinstance(record.get("id"), (str, int)):
            name += f" (id {record['id']})"
        if not isinstance(record, dict) or "conversations" not in record:
            raise MobiLlamaError(f"sample {name}: expected an object with 'conversations'")
        try:
            conversation = normalise(record, "sharegpt")
        except ValueError as e:
            raise MobiLlamaError(f"sample {name}: {e}") from None
        images = _image_list(record.get("image"), path.parent, name)
        placeholders = sum(turn["content"].count(IMAGE_PLACEHOLDER) for turn in conversation)
        if placeholders != len(images):
            if placeholders and not images:
                what = f"has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but no 'image'"
            elif images and not placeholders:
                what = f"has {len(images)} image(s) but no {IMAGE_PLACEHOLDER} placeholder"
            else:
                what = f"has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)"
            raise MobiLlamaError(f"sample {name} {what}")
        if any(IMAGE_PLACEHOLDER in t["content"] for t in conversation if t["role"] == "assistant"):
            raise MobiLlamaError(
                f"sample {name}: {IMAGE_PLACEHOLDER} belongs in a user turn, not the assistant's"
            )
        example = conversation_example(tokenizer, name, conversation, images, max_length)
        if example is None:
            skipped["truncated"] += 1
        else:
            examples.append(example)
    if not examples:
        raise MobiLlamaError(f"{path}: no usable samples (skipped: {skipped})")
    return examples, skipped


def random_view(image, rng: random.Random, min_scale: float = 0.7):
    """Augmentation: the image shrunk by a random factor in [min_scale, 1] and placed at a random spot
    of a white canvas of its own size, so a model learns objects rather than exact pixel positions."""
    from PIL import Image

    scale = rng.uniform(min_scale, 1.0)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", image.size, (255, 255, 255))
    canvas.paste(
        image.resize((w, h), Image.BICUBIC),
        (rng.randint(0, image.width - w), rng.randint(0, image.height - h)),
    )
    return canvas


def collate_vision(
    examples: list[VisionExample],
    processor,
    pad_id: int,
    blank_images: bool = False,
    augment: random.Random | None = None,
) -> dict[str, torch.Tensor]:
    """A right-padded batch for the loop: ``input_ids``, ``attention_mask``, shifted ``labels`` (the target
    at each position) and ``pixel_values`` of every image in row order ([0, 3, H, W] when none).

    ``blank_images`` feeds all-zero pixels instead (the text-only control of the caption benchmark: same
    model, tokens and positions, no image information). With an ``augment`` generator every image is
    replaced by a :func:`random_view` of it."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    images = []
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, : n - 1] = torch.tensor(e.labels[1:], dtype=torch.long)
        images += [None if blank_images else load_image(p, e.name) for p in e.images]
    if augment is not None and not blank_images:
        images = [random_view(image, augment) for image in images]
    size = processor.crop_size["height"], processor.crop_size["width"]
    if images and not blank_images:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    else:
        pixels = torch.zeros((len(images), 3, *size))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


class VisionBatches:
    """The loop's batch source: ``next_step()`` returns one optimizer step of micro-batches, in a seeded
    per-epoch order; ``state_dict()``/``load_state_dict()`` resume at the exact position. Under
    several ranks each rank takes every ``world_size``-th micro-batch of the step."""

    def __init__(
        self,
        examples: list[VisionExample],
        processor,
        pad_id: int,
        *,
        micro_batch_size: int,
        grad_accum: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        blank_images: bool = False,
        augment: bool = False,
    ) -> None:
        if not examples:
            raise MobiLlamaError("no training examples")
        self.examples, self.processor, self.pad_id = examples, processor, pad_id
        self.micro, self.accum, self.seed = micro_batch_size, grad_accum, seed
        self.rank, self.world = rank, world_size
        self.epoch, self.position = 0, 0
        self.blank_images, self.augment = blank_images, augment

    def _order(self) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 100003 + self.epoch).shuffle(order)
        return order

    def _take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            order = self._order()
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            grab = order[self.position : self.position + n - len(out)]
            out += grab
            self.position += len(grab)
        return out

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        # the augmentation draws depend only on the position, so a resumed run sees the same views
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.position}/{self.rank}") if self.augment else None
        picked = self._take(self.micro * self.accum * self.world)
        mine = []
        for m in range(self.accum):
            lo = (m * self.world + self.rank) * self.micro
            mine.append(self.collate([self.examples[i] for i in picked[lo : lo + self.micro]], rng))
        return mine

    def collate(self, examples: list[VisionExample], rng: random.Random | None) -> dict[str, torch.Tensor]:
        """One micro-batch (a subclass changes what a batch holds, the order and resume logic stay)."""
        return collate_vision(examples, self.processor, self.pad_id, self.blank_images, rng)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


def eval_batches(
    examples: list[VisionExample], processor, pad_id: int, batch_size: int, blank_images: bool = False
):
    """Held-out batches in file order (for the loop's ``val_batches`` and the caption benchmark)."""
    for i in range(0, len(examples), batch_size):
        yield collate_vision(examples[i : i + batch_size], processor, pad_id, blank_images)
