"""Contrastive encoder pre-training: it learns to pair images with captions, writes a CLIP directory the
vision model loads, resumes exactly, and refuses bad input with one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mobillama.cli import main
from mobillama.errors import MobiLlamaError
from mobillama.vision.encoder_pretrain import (
    EOT_ID,
    MAX_TEXT_BYTES,
    REPORT_NAME,
    clip_config,
    encode_caption,
    load_pairs,
    pretrain_encoder,
    retrieval_accuracy,
)

QUICK = dict(
    encoder_config="tiny", batch_size=8, lr=3e-3, warmup_steps=2, progress=False, say=lambda _m: None
)


def test_captions_become_bytes_ending_at_the_pooled_token():
    assert encode_caption(" a red circle ") == [b + 1 for b in b"a red circle"] + [EOT_ID]
    long = encode_caption("x" * 500)
    assert len(long) == MAX_TEXT_BYTES and long[-1] == EOT_ID
    # transformers pools the text tower at the first end-of-text id only when eos_token_id != 2
    assert clip_config("tiny").text_config.eos_token_id == EOT_ID


def test_pretraining_learns_to_pair_images_with_captions(shapes_dir, tmp_path):
    from transformers import CLIPModel

    from mobillama.vision.encoder import build_image_processor, encoder_config_from_preset

    pairs = load_pairs(shapes_dir / "captions.jsonl")
    processor = build_image_processor(encoder_config_from_preset("tiny"))
    torch.manual_seed(0)
    untrained = retrieval_accuracy(CLIPModel(clip_config("tiny")), pairs, processor)
    summary = pretrain_encoder(
        shapes_dir / "captions.jsonl", tmp_path / "run", max_steps=60, augment=False, **QUICK
    )
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < 0.5 * losses[0]
    accuracy = summary["retrieval_top1"][str(shapes_dir / "captions.jsonl")]
    assert accuracy >= 0.75 > untrained  # 8 distinct captions: chance is 1/8
    report = json.loads((tmp_path / "run" / "final" / REPORT_NAME).read_text())
    assert report["retrieval_top1"][str(shapes_dir / "captions.jsonl")] == accuracy
    assert report["pairs"] == 8 and len(report["data_sha256"]) == 64


def test_final_and_step_checkpoints_are_clip_directories_the_vision_model_loads(shapes_dir, tmp_path):
    from safetensors.torch import load_file

    from mobillama.config import get_preset
    from mobillama.model import MobiLlama
    from mobillama.vision.encoder import load_local_encoder
    from mobillama.vision.model import MobiLlamaV

    pretrain_encoder(
        shapes_dir / "captions.jsonl", tmp_path / "run", max_steps=4, checkpoint_every=2, **QUICK
    )
    saved = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    for directory in (tmp_path / "run" / "final", tmp_path / "run" / "checkpoints" / "step-00000002"):
        vision_config, encoder = load_local_encoder(directory)
        assert vision_config.encoder["image_size"] == 32 and vision_config.drop_cls
        if directory.name == "final":
            for name, tensor in encoder.state_dict().items():
                assert torch.equal(tensor, saved[f"vision_model.{name}"]), name
        model = MobiLlamaV(MobiLlama(get_preset("micro").replace(vocab_size=320)), vision_config, encoder)
        assert model.vision_config.num_image_tokens == 16


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(shapes_dir, tmp_path):
    from safetensors.torch import load_file

    data = shapes_dir / "captions.jsonl"
    pretrain_encoder(data, tmp_path / "a", max_steps=6, augment=True, **QUICK)
    pretrain_encoder(data, tmp_path / "b", max_steps=6, augment=True, checkpoint_every=3, **QUICK)
    # as if killed after step 3: the later checkpoint and the export never happened
    shutil.rmtree(tmp_path / "b" / "final")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000006")
    pretrain_encoder(
        data, tmp_path / "b", max_steps=6, augment=True, checkpoint_every=3, resume="auto", **QUICK
    )
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_bad_input_is_one_clear_error(shapes_dir, tmp_path):
    data = shapes_dir / "captions.jsonl"
    with pytest.raises(MobiLlamaError, match="batch_size must be at least 2"):
        pretrain_encoder(data, tmp_path / "o", max_steps=1, **{**QUICK, "batch_size": 1})
    with pytest.raises(MobiLlamaError, match="data file not found"):
        pretrain_encoder(tmp_path / "missing.jsonl", tmp_path / "o", max_steps=1, **QUICK)
    with pytest.raises(MobiLlamaError, match="unknown encoder config 'huge'"):
        pretrain_encoder(data, tmp_path / "o", max_steps=1, **{**QUICK, "encoder_config": "huge"})
    one = tmp_path / "one.jsonl"
    one.write_text(data.read_text().splitlines()[0] + "\n")
    (tmp_path / "red_circle.png").write_bytes((shapes_dir / "red_circle.png").read_bytes())
    with pytest.raises(MobiLlamaError, match="at least 2 caption pairs"):
        pretrain_encoder(one, tmp_path / "o", max_steps=1, **QUICK)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "red_circle.png"}\n')
    with pytest.raises(MobiLlamaError, match="bad.jsonl:1: 'caption' must be a non-empty string"):
        pretrain_encoder(bad, tmp_path / "o", max_steps=1, **QUICK)
    (tmp_path / "o" / "final").mkdir(parents=True)
    with pytest.raises(MobiLlamaError, match="already exists"):
        pretrain_encoder(data, tmp_path / "o", max_steps=1, **QUICK)


def test_cli_runs_and_reports_user_mistakes_in_one_line(shapes_dir, tmp_path, capsys):
    args = [
        "vision",
        "pretrain-encoder",
        "--data",
        str(shapes_dir / "captions.jsonl"),
        "--encoder-config",
        "tiny",
    ]
    assert main([*args, "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "retrieval top-1 on" in out and '"retrieval_top1"' in out
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert main([*args, "--out", str(tmp_path / "x"), "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "batch_size must be at least 2" in err and "Traceback" not in err


def test_a_clip_directory_missing_a_vision_tensor_is_refused(shapes_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from mobillama.vision.encoder import load_local_encoder

    pretrain_encoder(shapes_dir / "captions.jsonl", tmp_path / "run", max_steps=1, **QUICK)
    weights = tmp_path / "run" / "final" / "model.safetensors"
    state = load_file(str(weights))
    del state["vision_model.post_layernorm.weight"]
    save_file(state, str(weights))
    with pytest.raises(MobiLlamaError, match="lacks vision tensor 'post_layernorm.weight'"):
        load_local_encoder(tmp_path / "run" / "final")
