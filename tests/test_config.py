import json

import pytest
import torch

from fixtures import llama3_scaling
from mobillama.config import (
    DTYPES,
    FFN_PREFIX,
    FFN_PROJS,
    PRESETS,
    ModelConfig,
    ffn_weight_name,
    get_preset,
    parse_dtype,
    resolve_config,
)
from mobillama.errors import MobiLlamaError


def test_sharing_modes_map_layers_to_ffns():
    cfg = get_preset("micro")  # 4 layers
    assert [cfg.replace(ffn_sharing="all").ffn_index(i) for i in range(4)] == [0, 0, 0, 0]
    assert [cfg.replace(ffn_sharing="none").ffn_index(i) for i in range(4)] == [0, 1, 2, 3]
    assert [cfg.replace(ffn_sharing="group:2").ffn_index(i) for i in range(4)] == [0, 0, 1, 1]
    assert cfg.replace(ffn_sharing="group:3").num_ffns == 2  # groups of 3, 1


@pytest.mark.parametrize(
    "sharing, index",
    [
        ("dedicated:1+all", [0, 1, 1, 1, 1, 1, 1, 1]),
        ("dedicated:2+group:2", [0, 1, 2, 2, 3, 3, 4, 4]),
        ("dedicated:3+group:2", [0, 1, 2, 3, 3, 4, 4, 5]),  # uneven last group
        ("dedicated:7+all", [0, 1, 2, 3, 4, 5, 6, 7]),
    ],
)
def test_dedicated_first_layers_then_sharing(sharing, index):
    """The first N layers keep their own FFN; ffn_index, num_ffns and ffn_groups agree with each other."""
    cfg = get_preset("micro").replace(num_hidden_layers=8, ffn_sharing=sharing)
    assert [cfg.ffn_index(i) for i in range(8)] == index
    assert cfg.num_ffns == index[-1] + 1 == len(cfg.ffn_groups)
    assert [cfg.ffn_index(i) for g in cfg.ffn_groups for i in g] == index
    assert [g for g, layers in enumerate(cfg.ffn_groups) for _ in layers] == index


@pytest.mark.parametrize(
    "bad",
    [
        "some",
        "group:",
        "group:0",
        "group:x",
        "groups:2",
        "",
        "dedicated:0+all",
        "dedicated:4+all",  # the micro preset has 4 layers: nothing left to share
        "dedicated:1+none",
        "dedicated:1",
        "dedicated:1+",
        "dedicated:x+all",
        "dedicated:1+dedicated:1+all",
        "keep:1+all",
    ],
)
def test_bad_sharing_value(bad):
    with pytest.raises(MobiLlamaError, match="ffn_sharing"):
        get_preset("micro").replace(ffn_sharing=bad)


def test_unknown_preset_lists_choices():
    with pytest.raises(MobiLlamaError, match="unknown preset 'nope'.*mobillama-0.5b"):
        get_preset("nope")


def test_yaml_round_trip(tmp_path):
    cfg = get_preset("tiny").replace(ffn_sharing="group:3")
    for name in ("c.yaml", "c.json"):
        cfg.save(tmp_path / name)
        assert ModelConfig.load(tmp_path / name) == cfg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"hidden_size": "big"}, "'hidden_size' must be int"),
        ({"hidden_sise": 64}, "unknown config field 'hidden_sise'"),
        ({"rms_norm_eps": True}, "'rms_norm_eps' must be a number"),
        ({"num_attention_heads": 3, "hidden_size": 64}, "not divisible"),
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"vocab_size": 0}, "'vocab_size' must be positive"),
    ],
)
def test_malformed_config_names_the_field(tmp_path, data, message):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(data))
    with pytest.raises(MobiLlamaError, match=message):
        ModelConfig.load(path)


def test_checkpoint_config_requires_shape_fields(tmp_path):
    data = get_preset("micro").to_dict()
    del data["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mobillama", **data}))
    with pytest.raises(MobiLlamaError, match="missing config field 'hidden_size'"):
        resolve_config(tmp_path)


def test_checkpoint_config_ignores_hf_bookkeeping(tmp_path):
    data = {
        "model_type": "mobillama",
        "transformers_version": "5.0",
        "dtype": "float32",
        **get_preset("micro").to_dict(),
    }
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert resolve_config(tmp_path) == get_preset("micro")


def test_not_json_and_not_a_mapping(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(MobiLlamaError, match="not valid JSON"):
        ModelConfig.load(tmp_path / "a.json")
    (tmp_path / "b.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(MobiLlamaError, match="expected a mapping"):
        ModelConfig.load(tmp_path / "b.yaml")
    with pytest.raises(MobiLlamaError, match="config file not found"):
        ModelConfig.load(tmp_path / "missing.yaml")


def test_resolve_config_errors(tmp_path):
    with pytest.raises(MobiLlamaError, match="no config.json"):
        resolve_config(tmp_path)
    with pytest.raises(MobiLlamaError, match="neither a preset"):
        resolve_config(tmp_path / "nothing")


def test_presets_match_reference_shapes():
    p = PRESETS
    assert (
        p["mobillama-0.5b"].hidden_size,
        p["mobillama-0.5b"].intermediate_size,
        p["mobillama-0.5b"].ffn_sharing,
    ) == (2048, 5632, "all")
    assert (
        p["mobillama-0.8b"].hidden_size,
        p["mobillama-0.8b"].intermediate_size,
        p["mobillama-0.8b"].max_position_embeddings,
    ) == (2560, 10240, 2560)
    assert p["large-base-1.2b"].ffn_sharing == "none"
    assert p["baseline2-0.5b"].num_hidden_layers == 8
    assert all(
        c.rms_norm_eps == 1e-5 and c.vocab_size == 32000 for n, c in p.items() if "0." in n or "1.2b" in n
    )


def test_ffn_weight_names_are_the_model_parameter_names(micro_config):
    from mobillama.model import MobiLlama

    names = {n for n, _ in MobiLlama(micro_config).named_parameters() if n.startswith(FFN_PREFIX)}
    assert names == {ffn_weight_name(g, p) for g in range(micro_config.num_ffns) for p in FFN_PROJS}


def test_dtype_names():
    assert parse_dtype("bf16") is parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("fp16") is torch.float16 and parse_dtype("float32") is DTYPES["fp32"] is torch.float32
    with pytest.raises(MobiLlamaError, match="unknown dtype 'int8'; choose one of: fp32, float32, bf16"):
        parse_dtype("int8")


LLAMA3 = llama3_scaling(8192)


def test_rope_scaling_defaults_to_none_and_round_trips(tmp_path):
    assert ModelConfig().rope_scaling is None and all(p.rope_scaling is None for p in PRESETS.values())
    for scaling in ({"rope_type": "linear", "factor": 2}, LLAMA3):
        cfg = get_preset("micro").replace(rope_scaling=scaling)
        for name in ("c.yaml", "c.json"):
            cfg.save(tmp_path / name)
            assert ModelConfig.load(tmp_path / name) == cfg
    cfg = get_preset("micro").replace(rope_scaling=LLAMA3)
    cfg.rope_scaling["factor"] = 2.0  # each config owns its mapping
    assert LLAMA3["factor"] == 8.0


def test_config_json_without_rope_scaling_loads_as_plain_rope(tmp_path):
    """Checkpoints written before the field existed have no rope_scaling key."""
    data = {"model_type": "mobillama", **get_preset("micro").to_dict()}
    del data["rope_scaling"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert resolve_config(tmp_path) == get_preset("micro")
    assert resolve_config(tmp_path).rope_scaling is None


@pytest.mark.parametrize(
    ("scaling", "message"),
    [
        ("linear", "'rope_scaling' must be a mapping or null, got 'linear'"),
        ({"rope_type": "yarn", "factor": 4.0}, "rope_type 'yarn' is not supported"),
        ({"type": "linear", "factor": 2.0}, "rope_type None is not supported"),
        ({"rope_type": "linear"}, "missing key 'factor' for rope_type 'linear'"),
        ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, "unknown key 'rope_theta'"),
        ({"rope_type": "linear", "factor": 0}, "'factor' must be a positive number, got 0"),
        ({"rope_type": "linear", "factor": -2.0}, "'factor' must be a positive number"),
        ({"rope_type": "linear", "factor": True}, "'factor' must be a positive number, got True"),
        ({"rope_type": "linear", "factor": "2"}, "'factor' must be a positive number, got '2'"),
        ({"rope_type": "linear", "factor": float("nan")}, "'factor' must be a positive number"),
        (
            {**LLAMA3, "original_max_position_embeddings": 8192.0},
            "'original_max_position_embeddings' must be",
        ),
        ({**LLAMA3, "low_freq_factor": 0.0}, "'low_freq_factor' must be a positive number"),
        ({**LLAMA3, "high_freq_factor": 1.0}, "'high_freq_factor' \\(1.0\\) must be greater than"),
        ({k: v for k, v in LLAMA3.items() if k != "high_freq_factor"}, "missing key 'high_freq_factor'"),
    ],
)
def test_bad_rope_scaling_is_one_line_naming_the_key(tmp_path, scaling, message):
    with pytest.raises(MobiLlamaError, match=message) as info:
        get_preset("micro").replace(rope_scaling=scaling)
    assert "\n" not in str(info.value)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**get_preset("micro").to_dict(), "rope_scaling": scaling}, allow_nan=True))
    with pytest.raises(MobiLlamaError, match=f"{path}: .*rope_scaling"):
        ModelConfig.load(path)


def test_a_local_directory_named_like_a_preset_is_read_not_the_preset(tmp_path, monkeypatch):
    """One rule everywhere (config.preset_name): a preset name counts only when no such file exists."""
    from mobillama.checkpoint import load_model, save_checkpoint
    from mobillama.infer.load import describe_checkpoint
    from mobillama.model import MobiLlama

    config = get_preset("micro").replace(num_hidden_layers=1)
    save_checkpoint(MobiLlama(config), config, tmp_path / "micro")
    monkeypatch.chdir(tmp_path)
    assert resolve_config("micro") == config
    assert load_model("micro").config == config
    assert describe_checkpoint("micro").kind == "checkpoint"
    monkeypatch.chdir(tmp_path / "micro")  # no file called 'micro' here: the preset
    assert resolve_config("micro") == get_preset("micro")
    assert load_model("micro").config == get_preset("micro")
    assert describe_checkpoint("micro").kind == "preset"
