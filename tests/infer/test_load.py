"""describe_checkpoint: the one answer to "what is this model argument?" (preset, plain, imported,
quantized, MobiLlama-V), from marker files only; bad arguments are one-line errors."""

from __future__ import annotations

import json

import pytest

from mobillama.errors import MobiLlamaError
from mobillama.infer.load import describe_checkpoint, load_for_inference


def _write(path, name: str, data) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(json.dumps(data), encoding="utf-8")


def test_each_kind_is_recognised(tmp_path):
    assert describe_checkpoint("micro").kind == "preset" and describe_checkpoint("micro").is_preset
    plain = tmp_path / "plain"
    _write(plain, "config.json", {})
    assert (
        describe_checkpoint(plain).kind == "checkpoint" and describe_checkpoint(plain).source_format is None
    )
    imported = tmp_path / "imported"
    _write(imported, "config.json", {})
    _write(imported, "conversion.json", {"source_format": "gguf"})
    assert describe_checkpoint(imported).source_format == "gguf"
    quantized = tmp_path / "q"
    _write(quantized, "config.json", {})
    _write(quantized, "quantization.json", {"bits": 4, "group_size": 32, "modules": ["lm_head"]})
    what = describe_checkpoint(quantized)
    assert what.is_quantized and what.quantization["bits"] == 4 and not what.is_vision
    vision = tmp_path / "v"
    _write(vision, "vision_config.json", {})
    assert describe_checkpoint(vision).is_vision
    # a directory named like a preset is the directory
    named = tmp_path / "micro"
    _write(named, "config.json", {})
    assert describe_checkpoint(named).kind == "checkpoint"


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(MobiLlamaError, match="neither a preset"):
        describe_checkpoint(tmp_path / "nope")
    with pytest.raises(MobiLlamaError, match="checkpoint not found"):
        describe_checkpoint("micro", presets=False)
    bad = tmp_path / "bad"
    _write(bad, "quantization.json", {"bits": 3, "group_size": None, "modules": []})
    with pytest.raises(MobiLlamaError, match="bits must be 8 or 4"):
        describe_checkpoint(bad)
    vision = tmp_path / "v"
    _write(vision, "vision_config.json", {})
    with pytest.raises(MobiLlamaError, match="MobiLlama-V checkpoint"):
        load_for_inference(vision)
    with pytest.raises(MobiLlamaError, match="unknown dtype 'fp16'; choose one of: fp32, float32, bf16"):
        load_for_inference("micro", dtype="fp16")
