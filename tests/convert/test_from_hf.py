"""``convert from-hf``: the original release layout imports and reproduces the original model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fixtures import llama3_scaling
from mobillama.checkpoint import load_checkpoint, load_model
from mobillama.convert import import_hf
from mobillama.errors import MobiLlamaError


@pytest.mark.parametrize(("fmt", "shards"), [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 2)])
def test_release_layout_imports_as_shared(tmp_path, rel, ids, fmt, shards):
    original = rel.stock_llama(shared=True)
    src = rel.write_release(
        tmp_path / "release",
        rel.release_state(original),
        rel.release_config(original),
        fmt=fmt,
        shards=shards,
    )
    report = import_hf(src, tmp_path / "out")
    config, state = load_checkpoint(tmp_path / "out")
    assert config.ffn_sharing == "all" and report.ffn_copies_identical is True
    assert config.num_key_value_heads == 4  # from the k_proj shape, not the wrong field (2)
    assert any("num_key_value_heads 2" in n and "using 4" in n for n in report.notices)
    assert any("inv_freq" in n for n in report.notices)
    assert sorted(k for k in state if ".ffns." in k) == [
        f"model.ffns.0.{p}_proj.weight" for p in ("down", "gate", "up")
    ]
    assert not any("inv_freq" in k or ".mlp." in k for k in state)
    diff = (load_model(tmp_path / "out")(ids) - rel.reference_logits(original, ids)).abs().max().item()
    assert diff <= rel.TOL
    lineage = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert lineage["ffn_sharing"] == "all" and lineage["source_format"].startswith(
        "safetensors" if fmt == "safetensors" else "pytorch-bin"
    )
    assert len(lineage["weight_files"]) == shards


def test_differing_copies_import_as_none_with_notice(tmp_path, rel, ids):
    original = rel.stock_llama(shared=False)  # the 1B "large base": 4 different FFNs
    src = rel.write_release(tmp_path / "release", rel.release_state(original), rel.release_config(original))
    report = import_hf(src, tmp_path / "out")
    assert report.ffn_sharing == "none" and report.ffn_copies_identical is False
    notice = next(n for n in report.notices if "not identical" in n)
    assert "model.layers.1.mlp.gate_proj.weight" in notice
    config, _ = load_checkpoint(tmp_path / "out")
    assert config.ffn_sharing == "none" and config.num_ffns == 4
    diff = (load_model(tmp_path / "out")(ids) - rel.reference_logits(original, ids)).abs().max().item()
    assert diff <= rel.TOL


def test_copies_differing_in_one_late_tensor_are_caught(tmp_path, rel):
    original = rel.stock_llama(shared=True)
    state = rel.release_state(original)
    state["model.layers.3.mlp.down_proj.weight"][0, 0] += 1e-7  # one value, one ulp-scale change
    src = rel.write_release(tmp_path / "release", state, rel.release_config(original))
    report = import_hf(src, tmp_path / "out")
    assert report.ffn_sharing == "none"
    assert any("model.layers.3.mlp.down_proj.weight differs" in n for n in report.notices)


def test_collapse_layer_makes_a_shared_model(tmp_path, rel, ids):
    original = rel.stock_llama(shared=False)
    src = rel.write_release(tmp_path / "release", rel.release_state(original), rel.release_config(original))
    report = import_hf(src, tmp_path / "out", collapse="layer:2")
    config, state = load_checkpoint(tmp_path / "out")
    assert config.ffn_sharing == "all" and config.num_ffns == 1
    assert torch.equal(state["model.ffns.0.up_proj.weight"], original.model.layers[2].mlp.up_proj.weight)
    assert any("collapsed to layer 2" in n for n in report.notices)
    # The shared model equals a stock Llama whose layers all use layer 2's MLP.
    for layer in original.model.layers:
        layer.mlp = original.model.layers[2].mlp
    diff = (load_model(tmp_path / "out")(ids) - rel.reference_logits(original, ids)).abs().max().item()
    assert diff <= rel.TOL


def test_collapse_mean(tmp_path, rel):
    original = rel.stock_llama(shared=False)
    src = rel.write_release(tmp_path / "release", rel.release_state(original), rel.release_config(original))
    import_hf(src, tmp_path / "out", collapse="mean")
    config, state = load_checkpoint(tmp_path / "out")
    expected = torch.stack([layer.mlp.gate_proj.weight for layer in original.model.layers]).mean(0)
    assert config.ffn_sharing == "all"
    assert torch.allclose(state["model.ffns.0.gate_proj.weight"], expected, atol=1e-7)


def test_collapse_on_identical_copies_is_a_no_op_with_notice(tmp_path, rel):
    original = rel.stock_llama(shared=True)
    src = rel.write_release(tmp_path / "release", rel.release_state(original), rel.release_config(original))
    report = import_hf(src, tmp_path / "out", collapse="mean")
    assert report.ffn_sharing == "all"
    assert any("nothing to do" in n for n in report.notices)


def test_plain_llama_saved_by_transformers_with_gqa(tmp_path, rel, ids):
    original = rel.stock_llama(shared=False, num_key_value_heads=2)
    original.save_pretrained(tmp_path / "llama")  # transformers 5.x layout: rope_parameters, no inv_freq
    report = import_hf(tmp_path / "llama", tmp_path / "out")
    config, _ = load_checkpoint(tmp_path / "out")
    assert config.num_key_value_heads == 2 and config.ffn_sharing == "none"
    assert not any("num_key_value_heads" in n for n in report.notices)  # the field was right
    diff = (load_model(tmp_path / "out")(ids) - rel.reference_logits(original, ids)).abs().max().item()
    assert diff <= rel.TOL


LLAMA3 = llama3_scaling(32)
LINEAR = {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("scaling", [LINEAR, LLAMA3], ids=["linear", "llama3"])
def test_rope_scaled_llama_saved_by_transformers_gives_its_logits(tmp_path, rel, ids, scaling):
    """The real check of the scaling math: a stock LlamaForCausalLM with Llama 3 / linear RoPE scaling,
    saved by transformers 5.x (rope_parameters), imports to a model with the same logits."""
    original = rel.stock_llama(shared=False, rope_parameters={**scaling, "rope_theta": 5e5})
    original.save_pretrained(tmp_path / "llama")
    report = import_hf(tmp_path / "llama", tmp_path / "out")
    config, _ = load_checkpoint(tmp_path / "out")
    assert config.rope_scaling == scaling and config.rope_theta == 5e5
    assert any(f"RoPE scaling {scaling['rope_type']!r} (factor" in n for n in report.notices)
    want = rel.reference_logits(original, ids)
    diff = (load_model(tmp_path / "out")(ids) - want).abs().max().item()
    assert diff <= rel.TOL
    plain = load_model(tmp_path / "out").eval()  # the same weights without the scaling: far off
    plain.config.rope_scaling = None
    assert (plain(ids) - want).abs().max().item() > 100 * rel.TOL


def test_rope_scaling_in_transformers_4_files(tmp_path, rel, ids):
    """4.x keys: top-level rope_theta, rope_scaling with rope_type or the older type, and a llama3
    mapping without original_max_position_embeddings (transformers then uses max_position_embeddings)."""
    for name, rope_scaling, expected in (
        ("linear", {"type": "linear", "factor": 4.0}, LINEAR),
        (
            "llama3",
            {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"},
            {**LLAMA3, "original_max_position_embeddings": rel.TINY["max_position_embeddings"]},
        ),
    ):
        original = rel.stock_llama(shared=True, rope_parameters={**expected, "rope_theta": 10000.0})
        src = rel.write_release(
            tmp_path / name,
            rel.release_state(original, inv_freq=False),
            rel.release_config(original, rope_scaling=rope_scaling),
        )
        import_hf(src, tmp_path / f"{name}-out")
        config, _ = load_checkpoint(tmp_path / f"{name}-out")
        assert config.rope_scaling == expected, name
        diff = (load_model(tmp_path / f"{name}-out")(ids) - rel.reference_logits(original, ids)).abs().max()
        assert diff.item() <= rel.TOL, name


def test_tied_embeddings_and_dtype_cast(tmp_path, rel, ids):
    original = rel.stock_llama(shared=True)
    state = rel.release_state(original, inv_freq=False)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    src = rel.write_release(
        tmp_path / "release", state, rel.release_config(original, tie_word_embeddings=True)
    )
    import_hf(src, tmp_path / "out", dtype="bfloat16")
    config, saved = load_checkpoint(tmp_path / "out")
    assert config.tie_word_embeddings and "lm_head.weight" not in saved
    assert all(v.dtype == torch.bfloat16 for v in saved.values())


def test_tokenizer_files_are_copied(tmp_path, rel):
    original = rel.stock_llama(shared=True)
    src = rel.write_release(tmp_path / "release", rel.release_state(original), rel.release_config(original))
    rel.make_tokenizer(src)
    report = import_hf(src, tmp_path / "out")
    assert "tokenizer.json" in report.tokenizer_files
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_project_checkpoint_imports_trivially(tmp_path, rel, ids):
    original = rel.stock_llama(shared=True)
    src = rel.write_release(tmp_path / "release", rel.release_state(original), rel.release_config(original))
    import_hf(src, tmp_path / "project")
    report = import_hf(tmp_path / "project", tmp_path / "again")
    assert report.source_format == "mobillama"
    a, b = load_checkpoint(tmp_path / "project")[1], load_checkpoint(tmp_path / "again")[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- bad input: one clear error, nothing written -------------------------------------------------------


def _release(tmp_path, rel, *, fmt="safetensors", shards=1, state_edit=None, config_edit=None):
    original = rel.stock_llama(shared=True)
    state = rel.release_state(original)
    config = rel.release_config(original)
    if state_edit:
        state_edit(state)
    if config_edit:
        config_edit(config)
    return rel.write_release(tmp_path / "release", state, config, fmt=fmt, shards=shards)


def _expect_error(tmp_path, rel, src, match, **kwargs):
    with pytest.raises(MobiLlamaError, match=match) as info:
        import_hf(src, tmp_path / "out", **kwargs)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and not rel.leftovers(tmp_path, "out")


def _set(key, value):
    def edit(d):
        d[key] = value

    return edit


def _drop(key):
    return lambda d: d.pop(key)


CONFIG_CASES = [
    ("missing hidden_size", _drop("hidden_size"), "missing config field 'hidden_size'"),
    ("string size", _set("hidden_size", "64"), "'hidden_size' must be int"),
    ("bool size", _set("num_hidden_layers", True), "'num_hidden_layers' must be int"),
    ("float eps as string", _set("rms_norm_eps", "1e-5"), "'rms_norm_eps' must be number"),
    ("wrong model type", _set("model_type", "gpt2"), "model_type 'gpt2' is not supported"),
    (
        "yarn rope scaling",
        _set("rope_scaling", {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}),
        "RoPE scaling 'yarn' is not supported",
    ),
    (
        "dynamic rope parameters",
        _set("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
        "RoPE scaling 'dynamic' is not supported",
    ),
    (
        "linear without factor",
        _set("rope_scaling", {"rope_type": "linear"}),
        "missing key 'factor' for rope_type 'linear'",
    ),
    (
        "negative factor",
        _set("rope_scaling", {"rope_type": "linear", "factor": -2.0}),
        "rope_scaling: 'factor' must be a positive number, got -2.0",
    ),
    (
        "llama3 bands reversed",
        _set("rope_scaling", {**LLAMA3, "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
        "'high_freq_factor' \\(1.0\\) must be greater than 'low_freq_factor' \\(4.0\\)",
    ),
    ("rope scaling not a mapping", _set("rope_scaling", "linear"), "'rope_scaling' must be a mapping"),
    (
        "partial rotary",
        _set("rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
        "partial_rotary_factor 0.5 is not supported",
    ),
    ("biases", _set("attention_bias", True), "attention_bias is true"),
    ("activation", _set("hidden_act", "gelu"), "hidden_act 'gelu'"),
    ("indivisible heads", _set("num_attention_heads", 3), "divisible"),
    ("negative vocab", _set("vocab_size", -5), "positive"),
    ("head_dim field", _set("head_dim", 32), "head_dim 32"),
    ("fewer layers than weights", _set("num_hidden_layers", 3), "unexpected tensor 'model.layers.3"),
    ("more layers than weights", _set("num_hidden_layers", 5), "missing tensor 'model.layers.4"),
    ("vocab mismatch", _set("vocab_size", 100), "model.embed_tokens.weight' has shape"),
    ("huge vocab", _set("vocab_size", 2**40), "model.embed_tokens.weight' has shape"),
    ("huge hidden", _set("hidden_size", 2**40), "fits no number of key/value heads"),
    (
        "empty config",
        lambda d: d.clear() or d.update(model_type="llama"),
        "missing config field 'vocab_size'",
    ),
]


@pytest.mark.parametrize(("edit", "match"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_malformed_config(tmp_path, rel, edit, match):
    _expect_error(tmp_path, rel, _release(tmp_path, rel, config_edit=edit), match)


STATE_CASES = [
    ("missing norm", _drop("model.norm.weight"), "missing tensor 'model.norm.weight'"),
    (
        "missing mlp",
        _drop("model.layers.2.mlp.up_proj.weight"),
        "missing tensor 'model.layers.2.mlp.up_proj.weight'",
    ),
    (
        "missing k_proj",
        _drop("model.layers.0.self_attn.k_proj.weight"),
        "missing tensor 'model.layers.0.self_attn.k_proj",
    ),
    ("extra tensor", _set("model.extra.weight", torch.zeros(2)), "unexpected tensor 'model.extra.weight'"),
    (
        "extra mlp part",
        _set("model.layers.0.mlp.bias", torch.zeros(2)),
        "unexpected tensor 'model.layers.0.mlp.bias'",
    ),
    (
        "misshaped embed",
        _set("model.embed_tokens.weight", torch.zeros(384, 32)),
        "'model.embed_tokens.weight' has shape",
    ),
    (
        "misshaped mlp",
        _set("model.layers.1.mlp.down_proj.weight", torch.zeros(64, 64)),
        "'model.layers.1.mlp.down_proj.weight' has shape",
    ),
    (
        "misshaped k",
        _set("model.layers.0.self_attn.k_proj.weight", torch.zeros(24, 64)),
        "fits no number of key/value heads",
    ),
    (
        "misshaped norm",
        _set("model.layers.3.input_layernorm.weight", torch.zeros(65)),
        "'model.layers.3.input_layernorm.weight' has shape",
    ),
]


@pytest.mark.parametrize(("edit", "match"), [c[1:] for c in STATE_CASES], ids=[c[0] for c in STATE_CASES])
def test_bad_tensors(tmp_path, rel, edit, match):
    _expect_error(tmp_path, rel, _release(tmp_path, rel, state_edit=edit), match)


def test_not_a_checkpoint(tmp_path, rel):
    _expect_error(tmp_path, rel, tmp_path / "nope", "source not found")
    (tmp_path / "file.txt").write_text("x")
    _expect_error(tmp_path, rel, tmp_path / "file.txt", "not a checkpoint directory")
    (tmp_path / "empty").mkdir()
    _expect_error(tmp_path, rel, tmp_path / "empty", r"not a checkpoint directory \(no config.json\)")


def test_config_not_json_or_not_object(tmp_path, rel):
    src = _release(tmp_path, rel)
    (src / "config.json").write_text("{not json")
    _expect_error(tmp_path, rel, src, "config.json: not valid JSON")
    (src / "config.json").write_text("[1, 2]")
    _expect_error(tmp_path, rel, src, "expected a JSON object")
    (src / "config.json").write_text("")
    _expect_error(tmp_path, rel, src, "not valid JSON")


def test_no_weights_names_unsupported_files(tmp_path, rel):
    src = _release(tmp_path, rel)
    (src / "model.safetensors").unlink()
    (src / "flax_model.msgpack").write_bytes(b"\x00")
    _expect_error(tmp_path, rel, src, r"no weights found .*flax_model.msgpack")


def test_truncated_safetensors(tmp_path, rel):
    src = _release(tmp_path, rel)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path, rel, src, "model.safetensors: not a readable safetensors file")


def test_empty_safetensors_file(tmp_path, rel):
    src = _release(tmp_path, rel)
    (src / "model.safetensors").write_bytes(b"")
    _expect_error(tmp_path, rel, src, "not a readable safetensors file")


def test_truncated_bin(tmp_path, rel):
    src = _release(tmp_path, rel, fmt="bin")
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    _expect_error(tmp_path, rel, src, "pytorch_model.bin: not a loadable weights file")


def test_bin_with_non_tensor_values(tmp_path, rel):
    src = _release(tmp_path, rel, fmt="bin")
    torch.save({"model.norm.weight": [1.0, 2.0], "step": 3}, src / "pytorch_model.bin")
    _expect_error(tmp_path, rel, src, "expected a mapping of tensor names to tensors")


class _Exploit:
    """Unpickling this runs a shell command: exactly what weights_only=True must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_bin_with_arbitrary_object_is_refused_not_executed(tmp_path, rel):
    src = _release(tmp_path, rel, fmt="bin")
    marker = tmp_path / "pwned"
    torch.save({"model.norm.weight": _Exploit(marker)}, src / "pytorch_model.bin")
    _expect_error(tmp_path, rel, src, "pytorch_model.bin: not a loadable weights file")
    assert not marker.exists()


def test_sharded_index_problems(tmp_path, rel):
    src = _release(tmp_path, rel, shards=2)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    (src / "model-00002-of-00002.safetensors").rename(src / "moved.bin.bak")
    _expect_error(tmp_path, rel, src, "shard 'model-00002-of-00002.safetensors' not found")
    (src / "moved.bin.bak").rename(src / "model-00002-of-00002.safetensors")

    index_path.write_text("{")
    _expect_error(tmp_path, rel, src, "model.safetensors.index.json: not valid JSON")
    index_path.write_text(json.dumps({"metadata": {}}))
    _expect_error(tmp_path, rel, src, "missing or empty 'weight_map'")
    index_path.write_text(json.dumps({"weight_map": {**index["weight_map"], "model.norm.weight": "../x"}}))
    _expect_error(tmp_path, rel, src, "must be a file name in the same directory")

    listed = dict(index["weight_map"])
    listed["model.ghost.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps({"weight_map": listed}))
    _expect_error(
        tmp_path, rel, src, "tensor 'model.ghost.weight' listed in model.safetensors.index.json is missing"
    )

    unlisted = dict(index["weight_map"])
    unlisted.pop("model.norm.weight")
    index_path.write_text(json.dumps({"weight_map": unlisted}))
    _expect_error(tmp_path, rel, src, "'model.norm.weight' is in a shard but not in the index")


def test_same_tensor_in_two_shards(tmp_path, rel):
    src = _release(tmp_path, rel, shards=2)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = next(k for k, v in index["weight_map"].items() if v.startswith("model-00001"))
    from mobillama.checkpoint import read_safetensors

    second = read_safetensors(src / "model-00002-of-00002.safetensors")
    second[first] = torch.zeros(1)
    save_file(second, str(src / "model-00002-of-00002.safetensors"))
    _expect_error(tmp_path, rel, src, f"tensor '{first}' appears in both")


def test_output_exists_and_bad_options(tmp_path, rel):
    src = _release(tmp_path, rel)
    (tmp_path / "out").mkdir()
    with pytest.raises(MobiLlamaError, match="already exists"):
        import_hf(src, tmp_path / "out")
    (tmp_path / "out").rmdir()
    _expect_error(tmp_path, rel, src, "--collapse must be", collapse="layer:x")
    _expect_error(tmp_path, rel, src, "--collapse must be", collapse="median")
    _expect_error(tmp_path, rel, src, "unknown dtype", dtype="int8")


def test_collapse_layer_out_of_range(tmp_path, rel):
    original = rel.stock_llama(shared=False)
    src = rel.write_release(tmp_path / "release", rel.release_state(original), rel.release_config(original))
    _expect_error(tmp_path, rel, src, r"--collapse layer:9: the model has layers 0..3", collapse="layer:9")


def test_overwrite_replaces_output(tmp_path, rel):
    src = _release(tmp_path, rel)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    import_hf(src, tmp_path / "out", overwrite=True)
    assert (
        not (tmp_path / "out" / "stale.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()
    )


def test_adapter_file_beside_the_model_is_not_read(tmp_path, rel, ids):
    original = rel.stock_llama(shared=True)
    src = rel.write_release(tmp_path / "release", rel.release_state(original), rel.release_config(original))
    save_file({"base_model.lora_A.weight": torch.zeros(2, 2)}, str(src / "adapter_model.safetensors"))
    import_hf(src, tmp_path / "out")
    diff = (load_model(tmp_path / "out")(ids) - rel.reference_logits(original, ids)).abs().max().item()
    assert diff <= rel.TOL
