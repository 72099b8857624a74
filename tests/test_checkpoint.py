"""Checkpoint directories: round trip, atomic writes, and one clear error for every kind of bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mobillama.checkpoint import (
    SafetensorsReader,
    atomic_directory,
    check_state_dict,
    expected_shapes,
    load_checkpoint,
    load_model,
    read_pickle_weights,
    save_checkpoint,
)
from mobillama.config import get_preset
from mobillama.errors import MobiLlamaError


@pytest.fixture
def ckpt(tmp_path, seeded_model):
    cfg = get_preset("micro")
    model = seeded_model(cfg)
    return save_checkpoint(model, cfg, tmp_path / "ckpt"), model


def test_round_trip_equal_logits_and_files(ckpt):
    path, model = ckpt
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert json.loads((path / "config.json").read_text())["model_type"] == "mobillama"
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        assert torch.equal(load_model(path)(ids), model(ids))


def test_load_preset_gives_random_model():
    assert load_model("micro").config == get_preset("micro")


def test_bf16_save_and_load(tmp_path, seeded_model):
    cfg = get_preset("micro")
    path = save_checkpoint(seeded_model(cfg), cfg, tmp_path / "c", dtype=torch.bfloat16)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(path).lm_head.weight.dtype == torch.bfloat16


def test_existing_output_is_refused_and_kept(ckpt):
    path, model = ckpt
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(MobiLlamaError, match="already exists"):
        save_checkpoint(model, model.config, path)
    assert (path / "model.safetensors").read_bytes() == before


def test_failure_mid_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(OSError), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "partial").write_text("x")
        raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_on_success(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new").write_text("new")
        raise RuntimeError("crash")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old"]
    with atomic_directory(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"]


def test_missing_extra_and_misshaped_tensors_are_named(ckpt):
    path, model = ckpt
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        ({k: v for k, v in state.items() if k != "model.norm.weight"}, "missing tensor 'model.norm.weight'"),
        ({**state, "model.extra.weight": torch.zeros(1)}, "unexpected tensor 'model.extra.weight'"),
        (
            {**state, "model.norm.weight": torch.zeros(3)},
            r"'model.norm.weight' has shape \(3,\), expected \(64,\)",
        ),
    ]
    for bad_state, message in cases:
        save_file(bad_state, str(path / "model.safetensors"))
        with pytest.raises(MobiLlamaError, match=message):
            load_checkpoint(path)


def test_state_dict_check_against_explicit_shapes_and_dtypes():
    """The form a state dict that a config alone does not describe (quantized weights) is checked with."""
    cfg = get_preset("micro")
    shapes = expected_shapes(cfg)
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    check_state_dict(state, cfg, "s")  # a config and its own shapes agree
    check_state_dict(state, shapes, "s")
    packed = {
        "q.weight": torch.zeros(4, 8, dtype=torch.int8),
        "q.scales": torch.ones(4, dtype=torch.bfloat16),
    }
    want = {"q.weight": torch.Size([4, 8]), "q.scales": torch.Size([4])}
    dtypes = {"q.weight": torch.int8, "q.scales": torch.float32}
    check_state_dict(packed, want, "q", dtypes=dtypes)  # a float in another precision is fine
    with pytest.raises(
        MobiLlamaError, match="q: tensor 'q.weight' has dtype torch.uint8, expected torch.int8"
    ):
        check_state_dict({**packed, "q.weight": packed["q.weight"].to(torch.uint8)}, want, "q", dtypes=dtypes)
    with pytest.raises(
        MobiLlamaError, match="tensor 'q.scales' has dtype torch.int32, expected torch.float32"
    ):
        check_state_dict({**packed, "q.scales": torch.ones(4, dtype=torch.int32)}, want, "q", dtypes=dtypes)
    with pytest.raises(MobiLlamaError, match=r"q: tensor 'q.weight' has shape \(4, 9\), expected \(4, 8\)"):
        check_state_dict({**packed, "q.weight": torch.zeros(4, 9, dtype=torch.int8)}, want, "q")
    with pytest.raises(MobiLlamaError, match="q: missing tensor 'q.scales'"):
        check_state_dict({"q.weight": packed["q.weight"]}, want, "q")


def test_truncated_safetensors(ckpt):
    path, _ = ckpt
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MobiLlamaError, match="not a readable safetensors file"):
        load_checkpoint(path)
    (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(MobiLlamaError, match="not a readable safetensors file"):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(MobiLlamaError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(MobiLlamaError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "mobillama", **get_preset("micro").to_dict()})
    )
    with pytest.raises(MobiLlamaError, match="no model.safetensors"):
        load_checkpoint(tmp_path)


def test_llama_checkpoint_points_to_the_importer(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", **get_preset("micro").to_dict()})
    )
    with pytest.raises(MobiLlamaError, match="convert from-hf"):
        load_checkpoint(tmp_path)


def test_pickle_weights_are_read_without_code_execution(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": torch.zeros(2)}, tmp_path / "ok.bin")
    assert torch.equal(read_pickle_weights(tmp_path / "ok.bin")["w"], torch.zeros(2))
    torch.save({"w": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(MobiLlamaError, match="not a loadable weights file"):
        read_pickle_weights(tmp_path / "evil.bin")
    (tmp_path / "trunc.bin").write_bytes((tmp_path / "ok.bin").read_bytes()[:40])
    with pytest.raises(MobiLlamaError, match="not a loadable weights file"):
        read_pickle_weights(tmp_path / "trunc.bin")
    torch.save([torch.zeros(1)], tmp_path / "list.bin")
    with pytest.raises(MobiLlamaError, match="mapping of tensor names"):
        read_pickle_weights(tmp_path / "list.bin")


def test_safetensors_reader_reads_every_dtype_as_safe_open_does(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(4).bfloat16(),
        "f16": torch.randn(2, 2).half(),
        "i8": torch.randint(-128, 127, (7, 3), dtype=torch.int8),
        "u8": torch.randint(0, 255, (16,), dtype=torch.uint8),
        "i64": torch.arange(5),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(2.5),
    }
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    reader = SafetensorsReader(tmp_path / "m.safetensors")
    assert set(reader.entries) == set(tensors)
    meta = reader.shapes_and_dtypes()
    for name, want in tensors.items():
        got = reader.read(name)
        assert meta[name].shape == want.shape and meta[name].dtype == want.dtype
        assert got.dtype == want.dtype and torch.equal(got, want), name


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) - 10], "cut short|outside the file"),  # the last tensor loses its tail
        (lambda b: b[:20], "not a readable safetensors file"),  # the header itself is cut
        (lambda b: b"", "not a readable safetensors file"),
        (lambda b: (10**9).to_bytes(8, "little") + b[8:], "not a readable safetensors file"),
        (
            lambda b: (
                b[:8]
                + b"[1, 2, 3]"
                + b" " * (int.from_bytes(b[:8], "little") - 9)
                + b[8 + int.from_bytes(b[:8], "little") :]
            ),
            "not a mapping",
        ),
    ],
)
def test_safetensors_reader_names_the_file_for_a_damaged_one(tmp_path, damage, message):
    save_file({"a": torch.randn(64), "b": torch.randn(64)}, tmp_path / "m.safetensors")
    path = tmp_path / "m.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(MobiLlamaError, match=message) as info:
        reader = SafetensorsReader(path)
        for name in reader.entries:
            reader.read(name)
    assert str(path) in str(info.value)
