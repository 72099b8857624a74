"""MobiLlama-V model: image-token splicing, text-only path, save/load, generation."""

from __future__ import annotations

import pytest
import torch

from mobillama.errors import MobiLlamaError
from mobillama.vision.config import IMAGE_TOKEN_ID
from mobillama.vision.model import IGNORE_INDEX, MobiLlamaV


def test_image_tokens_number_and_position(tiny_model):
    m = tiny_model
    N = m.num_image_tokens
    assert N == 16  # 32 px / patch 8 -> 4x4 patches, CLS dropped
    IMG = IMAGE_TOKEN_ID
    ids = torch.tensor(
        [
            [5, 6, 7, 8, 9, 0, 0],  # no image, padded
            [5, IMG, 7, 8, 0, 0, 0],  # one image
            [IMG, 6, IMG, 8, 9, 10, 11],  # two images
        ]
    )
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0], [1] * 7])
    labels = torch.tensor(
        [
            [6, 7, 8, 9, -100, -100, -100],
            [-100, 7, 8, -100, -100, -100, -100],
            [-100, -100, 8, 9, 10, 11, -100],
        ]
    )
    pixels = torch.randn(3, 3, 32, 32)
    embeds, out_mask, out_labels = m.build_inputs(ids, pixels, mask, labels)
    assert embeds.shape == (3, 7 + 2 * (N - 1), 64)
    assert out_mask.sum(1).tolist() == [5, 4 + N - 1, 7 + 2 * (N - 1)]
    images = m.encode_images(pixels)
    table = m.decoder.model.embed_tokens.weight
    # row 1: token 5, then image 0 at slots 1..N, then tokens 7, 8
    assert torch.allclose(embeds[1, 0], table[5])
    assert torch.allclose(embeds[1, 1 : 1 + N], images[0])
    assert torch.allclose(embeds[1, 1 + N], table[7])
    # row 2: image 1 at 0..N-1, token 6, image 2, tokens 8..11
    assert torch.allclose(embeds[2, :N], images[1])
    assert torch.allclose(embeds[2, N], table[6])
    assert torch.allclose(embeds[2, N + 1 : 2 * N + 1], images[2])
    assert torch.allclose(embeds[2, 2 * N + 1 : 2 * N + 5], table[torch.tensor([8, 9, 10, 11])])
    # row 0 untouched text, padded to the new width
    assert torch.allclose(embeds[0, :5], table[torch.tensor([5, 6, 7, 8, 9])])
    assert (embeds[0, 7:] == 0).all() and (out_mask[0, 5:] == 0).all()
    # labels: image slots ignored except the last, which takes the placeholder's target
    assert out_labels[1, 1:N].eq(IGNORE_INDEX).all() and out_labels[1, N].item() == 7
    assert out_labels[2, N - 1].item() == -100 and out_labels[2, 2 * N].item() == 8
    # the number of target tokens is unchanged by the expansion
    assert int((out_labels != IGNORE_INDEX).sum()) == int((labels != IGNORE_INDEX).sum())


def test_placeholder_image_count_mismatch(tiny_model):
    ids = torch.tensor([[5, IMAGE_TOKEN_ID, 6]])
    with pytest.raises(MobiLlamaError, match="1 <image> placeholder.*0 image"):
        tiny_model(ids)
    with pytest.raises(MobiLlamaError, match="0 <image> placeholder.*2 image"):
        tiny_model(torch.tensor([[5, 6]]), pixel_values=torch.randn(2, 3, 32, 32))


def test_text_only_equals_decoder(tiny_model):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        out = tiny_model(ids).logits
        ref = tiny_model.decoder(ids)
    assert torch.allclose(out, ref, atol=1e-6)


def test_batched_rows_equal_single_rows(tiny_model):
    """Padding to the longest expanded row must not change a row's logits."""
    IMG = IMAGE_TOKEN_ID
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = tiny_model(torch.tensor([[5, IMG, 7]]), pixel_values=pixels[:1]).logits
        b = tiny_model(torch.tensor([[IMG, 6, IMG, 8]]), pixel_values=pixels[1:].repeat(2, 1, 1, 1)).logits
        both = tiny_model(
            torch.tensor([[5, IMG, 7, 0], [IMG, 6, IMG, 8]]),
            pixel_values=torch.cat([pixels[:1], pixels[1:], pixels[1:]]),
            attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        ).logits
    assert torch.allclose(both[0, : a.shape[1]], a[0], atol=1e-5)
    assert torch.allclose(both[1], b[0], atol=1e-5)


def test_save_load_round_trip(tiny_model, tmp_path, tokenizer):
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    tiny_model.save_pretrained(tmp_path / "ckpt", tokenizer_dir=tok_dir)
    loaded = MobiLlamaV.from_pretrained(tmp_path / "ckpt")
    ids = torch.tensor([[5, IMAGE_TOKEN_ID, 7, 8]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tiny_model(ids, pixels).logits, loaded(ids, pixels).logits)
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    assert (tmp_path / "ckpt" / "decoder" / "config.json").is_file()
    with pytest.raises(MobiLlamaError, match="already exists"):
        tiny_model.save_pretrained(tmp_path / "ckpt")


def test_load_bad_checkpoints(tiny_model, tmp_path):
    with pytest.raises(MobiLlamaError, match="not a MobiLlama-V checkpoint"):
        MobiLlamaV.from_pretrained(tmp_path)
    tiny_model.save_pretrained(tmp_path / "c")
    (tmp_path / "c" / "vision.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(MobiLlamaError, match="not a readable safetensors"):
        MobiLlamaV.from_pretrained(tmp_path / "c")
    tiny_model.save_pretrained(tmp_path / "d")
    (tmp_path / "d" / "vision_config.json").write_text('{"projector": "mlp9"}')
    with pytest.raises(MobiLlamaError, match="projector must be one of"):
        MobiLlamaV.from_pretrained(tmp_path / "d")
    (tmp_path / "d" / "vision_config.json").write_text("{not json")
    with pytest.raises(MobiLlamaError, match="not valid JSON"):
        MobiLlamaV.from_pretrained(tmp_path / "d")


def test_linear_projector_and_keep_cls():
    from mobillama.config import get_preset
    from mobillama.model import MobiLlama
    from mobillama.vision.encoder import encoder_config_from_preset

    vc = encoder_config_from_preset("tiny")
    vc.projector, vc.drop_cls = "linear", False
    m = MobiLlamaV(MobiLlama(get_preset("micro")), vc)
    assert m.num_image_tokens == 17
    assert m.encode_images(torch.randn(2, 3, 32, 32)).shape == (2, 17, 64)
    assert len(m.projector.layers) == 1


def test_generate_greedy_matches_forward(tiny_model):
    ids = torch.tensor([[1, IMAGE_TOKEN_ID, 7, 8]])
    pixels = torch.randn(1, 3, 32, 32)
    new = tiny_model.generate(ids, pixels, max_new_tokens=5)[0]
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            nxt = tiny_model(seq, pixels).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert new == seq[0, 4:].tolist()
    # batched generation with left padding gives each row its own answer
    both = tiny_model.generate(
        torch.tensor([[0, 1, IMAGE_TOKEN_ID, 7, 8], [1, IMAGE_TOKEN_ID, 7, 8, 9]]),
        torch.cat([pixels, pixels]),
        attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]),
        max_new_tokens=5,
    )
    assert both[0] == new
