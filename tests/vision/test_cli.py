"""The vision CLI: build-data, init, chat, train wiring; user mistakes -> one error line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mobillama.cli import main

from .conftest import draw_shape


@pytest.fixture()
def decoder_dir(tmp_path, tokenizer):
    import torch

    from mobillama.checkpoint import save_checkpoint
    from mobillama.config import get_preset
    from mobillama.model import MobiLlama

    tokenizer.save_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    config = get_preset("micro").replace(vocab_size=320)
    return save_checkpoint(MobiLlama(config), config, tmp_path / "dec", tokenizer_dir=tmp_path / "tok")


def test_init_and_chat(tmp_path, decoder_dir, capsys):
    out = tmp_path / "v"
    assert (
        main(["vision", "init", "--decoder", str(decoder_dir), "--encoder-config", "tiny", "--out", str(out)])
        == 0
    )
    cfg = json.loads((out / "vision_config.json").read_text())
    assert cfg["projector"] == "mlp2x_gelu" and cfg["encoder"]["image_size"] == 32
    assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()
    draw_shape("red", "circle").save(tmp_path / "q.png")
    capsys.readouterr()
    assert (
        main(["vision", "chat", str(out), "--image", str(tmp_path / "q.png"), "--max-new-tokens", "4"]) == 0
    )
    assert main(["vision", "chat", str(out), "--image", str(tmp_path / "missing.png")]) == 2
    assert "image file not found" in capsys.readouterr().err


def test_init_bad_input(tmp_path, decoder_dir, capsys):
    assert main(["vision", "init", "--decoder", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
    bad_enc = tmp_path / "enc"
    bad_enc.mkdir()
    (bad_enc / "config.json").write_text(json.dumps({"model_type": "bert"}))
    args = [
        "vision",
        "init",
        "--decoder",
        str(decoder_dir),
        "--encoder",
        str(bad_enc),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    assert "not a CLIP or SigLIP model" in capsys.readouterr().err
    args = [
        "vision",
        "init",
        "--decoder",
        str(decoder_dir),
        "--encoder-config",
        "tiny",
        "--feature-layer",
        "9",
    ]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert "--feature-layer 9" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_local_clip_encoder(tmp_path, decoder_dir):
    """A CLIP checkpoint directory (here: random, saved by transformers) loads without any download."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mobillama.vision.config import ENCODER_PRESETS
    from mobillama.vision.model import MobiLlamaV

    CLIPVisionModel(CLIPVisionConfig(**ENCODER_PRESETS["tiny"])).save_pretrained(tmp_path / "clip")
    out = tmp_path / "v"
    assert (
        main(
            [
                "vision",
                "init",
                "--decoder",
                str(decoder_dir),
                "--encoder",
                str(tmp_path / "clip"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    model = MobiLlamaV.from_pretrained(out)
    ref = CLIPVisionModel.from_pretrained(tmp_path / "clip")
    assert all((a == b).all() for a, b in zip(model.encoder.state_dict().values(), ref.state_dict().values()))


def test_build_data_from_stamps(tmp_path, capsys):
    stamps = tmp_path / "stamps" / "animals"
    stamps.mkdir(parents=True)
    for i, (c, s) in enumerate([("red", "circle"), ("blue", "square"), ("green", "circle")]):
        draw_shape(c, s, mode="RGBA").save(stamps / f"s{i}.png")
        (stamps / f"s{i}.txt").write_text(f"A {c} {s}.\nfr.utf8=Un {s}.\n")
    (stamps / "nocaption.png").write_bytes((stamps / "s0.png").read_bytes())
    out = tmp_path / "data"
    assert (
        main(
            [
                "vision",
                "build-data",
                "--out",
                str(out),
                "--stamps",
                str(tmp_path / "stamps"),
                "--val-every",
                "3",
            ]
        )
        == 0
    )
    val = [json.loads(x) for x in (out / "captions-val.jsonl").read_text().splitlines()]
    assert val == [{"image": "images/stamp-animals-s2.png", "caption": "A green circle."}]
    instruct = json.loads((out / "instruct.json").read_text())
    assert instruct[0]["conversations"][1]["value"] == "A red circle."
    # held-out views: every --views-every'th (default 5th) training stamp, a new image of the same object
    views = [json.loads(x) for x in (out / "captions-views.jsonl").read_text().splitlines()]
    assert views == [{"image": "images/view-stamp-animals-s0.png", "caption": "A red circle."}]
    with (
        Image.open(out / "images" / "stamp-animals-s0.png") as seen,
        Image.open(out / views[0]["image"]) as view,
    ):
        assert view.size == seen.size
        assert (
            np.abs(np.asarray(view.convert("RGBA"), float) - np.asarray(seen.convert("RGBA"), float)).mean()
            > 5
        )
        assert view.getbbox() is not None and view.getbbox() != seen.getbbox()  # moved and shrunk
    assert (
        main(
            [
                "vision",
                "build-data",
                "--out",
                str(tmp_path / "y"),
                "--stamps",
                str(tmp_path / "stamps"),
                "--views-every",
                "0",
            ]
        )
        == 2
    )
    assert "views_every must be an integer >= 1, got 0" in capsys.readouterr().err
    assert (
        main(["vision", "build-data", "--out", str(tmp_path / "x"), "--stamps", str(tmp_path / "none")]) == 2
    )
    assert "tuxpaint-stamps-default" in capsys.readouterr().err
