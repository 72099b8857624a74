"""Vision data: formats, placeholder/label rules, batches, and every bad input -> one clear error."""

from __future__ import annotations

import json

import pytest
import torch

from mobillama.errors import MobiLlamaError
from mobillama.vision.config import IMAGE_TOKEN_ID
from mobillama.vision.data import (
    VisionBatches,
    collate_vision,
    load_caption_examples,
    load_image,
    load_llava_examples,
)
from mobillama.vision.encoder import build_image_processor, encoder_config_from_preset
from mobillama.vision.model import IGNORE_INDEX

from .conftest import draw_shape


def _llava(tmp_path, records):
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    return path


def test_caption_rows(shapes_dir, tokenizer):
    examples = load_caption_examples(shapes_dir / "captions.jsonl", tokenizer)
    assert len(examples) == 8
    e = examples[0]
    assert e.input_ids[:2] == [tokenizer.bos_token_id, IMAGE_TOKEN_ID]
    assert e.labels[:2] == [IGNORE_INDEX, IGNORE_INDEX]
    assert e.input_ids[-1] == tokenizer.eos_token_id and e.labels[2:] == e.input_ids[2:]
    assert tokenizer.decode(e.input_ids[2:-1]) == "a red circle"


def test_llava_conversation_labels(tmp_path, shapes_dir, tokenizer):
    path = _llava(
        shapes_dir,
        [
            {
                "id": "x1",
                "image": "red_circle.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is in the picture?"},
                    {"from": "gpt", "value": "a red circle"},
                    {"from": "human", "value": "And <image> this one?"},
                    {"from": "gpt", "value": "a blue square"},
                ],
            }
        ],
    )
    rec = json.loads(path.read_text())
    rec[0]["image"] = ["red_circle.png", "blue_square.png"]
    path.write_text(json.dumps(rec))
    (e,), skipped = load_llava_examples(path, tokenizer)
    assert e.input_ids.count(IMAGE_TOKEN_ID) == 2 and len(e.images) == 2
    labelled = tokenizer.decode([t for t in e.labels if t != IGNORE_INDEX])
    assert labelled == " a red circle</s> a blue square</s>"
    text = tokenizer.decode([t for t in e.input_ids if t != IMAGE_TOKEN_ID])
    assert "What is in the picture?" in text and "<image>" not in text


def test_collate_shifts_labels_and_stacks_images(shapes_dir, tokenizer):
    examples = load_caption_examples(shapes_dir / "captions.jsonl", tokenizer)[:3]
    processor = build_image_processor(encoder_config_from_preset("tiny"))
    batch = collate_vision(examples, processor, pad_id=0)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    e = examples[0]
    n = len(e.input_ids)
    assert batch["labels"][0, : n - 1].tolist() == e.labels[1:]
    assert batch["labels"][0, n - 1 :].eq(IGNORE_INDEX).all()
    # white background normalised with CLIP stats is positive; the red disc's green channel is negative
    assert batch["pixel_values"][0, 1, 0, 0] > 1 and batch["pixel_values"][0, 1, 16, 16] < 0


def test_batches_resume_exactly(shapes_dir, tokenizer):
    examples = load_caption_examples(shapes_dir / "captions.jsonl", tokenizer)
    processor = build_image_processor(encoder_config_from_preset("tiny"))
    a = VisionBatches(examples, processor, 0, micro_batch_size=3, grad_accum=2, seed=5)
    a.next_step()
    state = a.state_dict()
    expected = a.next_step()
    b = VisionBatches(examples, processor, 0, micro_batch_size=3, grad_accum=2, seed=5)
    b.load_state_dict(state)
    got = b.next_step()
    assert len(got) == 2 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(got, expected))


def test_image_modes(tmp_path):
    rgba = draw_shape("red", "circle", mode="RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png", "s1")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    for mode in ("L", "P", "1", "CMYK"):
        draw_shape("blue", "square", mode=mode).save(
            tmp_path / f"b_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        )
        assert load_image(tmp_path / f"b_{mode}.{'jpg' if mode == 'CMYK' else 'png'}", "s").mode == "RGB"
    from PIL import Image

    Image.new("I;16", (8, 8)).save(tmp_path / "deep.png")
    with pytest.raises(MobiLlamaError, match=r"sample s9: .*unsupported mode 'I;16'"):
        load_image(tmp_path / "deep.png", "s9")


def test_missing_and_corrupt_images(tmp_path, tokenizer):
    with pytest.raises(MobiLlamaError, match="sample s2: image file not found"):
        load_image(tmp_path / "nope.png", "s2")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(MobiLlamaError, match="sample s3: cannot read image"):
        load_image(tmp_path / "bad.png", "s3")
    draw_shape("red", "circle").save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(MobiLlamaError, match="sample s4: cannot read image"):
        load_image(tmp_path / "trunc.png", "s4")
    # through a batch: the error names the record
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "missing.png", "caption": "a red circle"}) + "\n")
    examples = load_caption_examples(tmp_path / "c.jsonl", tokenizer)
    processor = build_image_processor(encoder_config_from_preset("tiny"))
    with pytest.raises(MobiLlamaError, match=r"sample c\.jsonl:1: image file not found"):
        collate_vision(examples, processor, 0)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {
                "id": "p",
                "conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}],
            },
            r"id p\) has 1 <image> placeholder\(s\) but no 'image'",
        ),
        (
            {
                "id": "q",
                "image": "a.png",
                "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}],
            },
            r"id q\) has 1 image\(s\) but no <image> placeholder",
        ),
        (
            {
                "id": "r",
                "image": "a.png",
                "conversations": [
                    {"from": "human", "value": "<image><image>"},
                    {"from": "gpt", "value": "x"},
                ],
            },
            r"has 2 <image> placeholder\(s\) but 1 image",
        ),
        (
            {
                "id": "s",
                "image": 7,
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}],
            },
            "'image' must be a path",
        ),
        ({"id": "t"}, "expected an object with 'conversations'"),
        ({"id": "u", "conversations": [{"from": "gpt", "value": "x"}]}, "starts with the assistant"),
    ],
)
def test_llava_bad_records(tmp_path, tokenizer, record, message):
    with pytest.raises(MobiLlamaError, match=message):
        load_llava_examples(_llava(tmp_path, [record]), tokenizer)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no records"),
        ("{bad json\n", "line 1 is not valid JSON"),
        ('{"image": "a.png"}\n', "'caption' must be a non-empty string"),
        ('{"image": "a.png", "caption": 5}\n', "'caption' must be a non-empty string"),
        ('{"caption": "x"}\n', "needs exactly one 'image'"),
        ('{"image": "a.png", "caption": "<image> x"}\n', "must not contain <image>"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_caption_bad_files(tmp_path, tokenizer, content, message):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(MobiLlamaError, match=message):
        load_caption_examples(tmp_path / "c.jsonl", tokenizer)


def test_caption_file_missing_or_binary(tmp_path, tokenizer):
    with pytest.raises(MobiLlamaError, match="data file not found"):
        load_caption_examples(tmp_path / "none.jsonl", tokenizer)
    (tmp_path / "b.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(MobiLlamaError, match="not UTF-8"):
        load_caption_examples(tmp_path / "b.jsonl", tokenizer)


def test_blank_image_control(shapes_dir, tokenizer):
    examples = load_caption_examples(shapes_dir / "captions.jsonl", tokenizer)
    processor = build_image_processor(encoder_config_from_preset("tiny"))
    batches = VisionBatches(examples, processor, 0, micro_batch_size=2, blank_images=True)
    batch = batches.next_step()[0]
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and not batch["pixel_values"].any()


def test_augmented_views_differ_from_the_image_and_resume_exactly(shapes_dir, tokenizer):
    examples = load_caption_examples(shapes_dir / "captions.jsonl", tokenizer)
    processor = build_image_processor(encoder_config_from_preset("tiny"))
    plain = VisionBatches(examples, processor, 0, micro_batch_size=4, seed=3).next_step()[0]
    a = VisionBatches(examples, processor, 0, micro_batch_size=4, seed=3, augment=True)
    first = a.next_step()[0]
    assert torch.equal(first["input_ids"], plain["input_ids"])  # same samples, same order
    assert not torch.equal(first["pixel_values"], plain["pixel_values"])  # shrunk and moved images
    state = a.state_dict()
    expected = a.next_step()[0]
    b = VisionBatches(examples, processor, 0, micro_batch_size=4, seed=3, augment=True)
    b.load_state_dict(state)
    assert torch.equal(b.next_step()[0]["pixel_values"], expected["pixel_values"])  # same draws after resume
