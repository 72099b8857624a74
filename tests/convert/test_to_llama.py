"""``convert to-llama``: stock transformers (without this package) loads the export and gets the same logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from fixtures import llama3_scaling
from mobillama.checkpoint import load_model, save_checkpoint
from mobillama.config import get_preset
from mobillama.convert import export_llama, import_hf
from mobillama.errors import MobiLlamaError

# Runs in a fresh interpreter that never imports mobillama: proves a plain transformers install suffices.
STOCK_LOADER = """
import sys, torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
assert type(model) is LlamaForCausalLM, type(model)
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
assert not any(m == "mobillama" or m.startswith("mobillama.") for m in sys.modules), "mobillama was imported"
print("ok")
"""


def _stock_logits(tmp_path, model_dir, ids) -> torch.Tensor:
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no project sources on the path
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            STOCK_LOADER,
            str(model_dir),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "logits.pt"),
        ],
        capture_output=True,
        text=True,
        env={**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.load(tmp_path / "logits.pt")


def test_round_trip_release_to_llama_in_stock_transformers(tmp_path, rel, ids):
    original = rel.stock_llama(shared=True)
    src = rel.write_release(
        tmp_path / "release", rel.release_state(original), rel.release_config(original), shards=2
    )
    rel.make_tokenizer(src)
    import_hf(src, tmp_path / "project")
    export_llama(tmp_path / "project", tmp_path / "llama")

    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 4 and "auto_map" not in config and "ffn_sharing" not in config
    with safe_open(str(tmp_path / "llama" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())  # noqa: SIM118
        for i in range(4):  # the shared FFN, duplicated per layer with identical values
            assert torch.equal(
                f.get_tensor(f"model.layers.{i}.mlp.up_proj.weight"),
                original.model.layers[0].mlp.up_proj.weight,
            )
    assert not any(".ffns." in k for k in keys)
    assert (tmp_path / "llama" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "llama" / "generation_config.json").read_text())["eos_token_id"] == 2

    diff = (
        (_stock_logits(tmp_path, tmp_path / "llama", ids) - rel.reference_logits(original, ids))
        .abs()
        .max()
        .item()
    )
    assert diff <= rel.TOL


@pytest.mark.parametrize("sharing", ["none", "group:2", "dedicated:1+all"])
def test_export_dedicated_and_grouped_gqa_models(tmp_path, sharing, realistic_model):
    from transformers import LlamaForCausalLM

    config = get_preset("micro").replace(ffn_sharing=sharing)  # 2 kv heads: grouped-query attention
    model = realistic_model(config)  # max |logit| ~14: 1e-4 is ~7e-6 of it
    save_checkpoint(model, config, tmp_path / "ckpt")
    export_llama(tmp_path / "ckpt", tmp_path / "llama")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert llama.config.num_key_value_heads == 2
    ids = torch.randint(0, config.vocab_size, (2, 64))
    with torch.no_grad():
        assert (llama(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_tied_embeddings_and_dtype(tmp_path, realistic_model):
    from transformers import LlamaForCausalLM

    config = get_preset("micro").replace(tie_word_embeddings=True)
    save_checkpoint(realistic_model(config), config, tmp_path / "ckpt")
    export_llama(tmp_path / "ckpt", tmp_path / "llama", dtype="bfloat16")
    with safe_open(str(tmp_path / "llama" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    model = load_model(tmp_path / "ckpt", dtype=torch.bfloat16).float()
    ids = torch.randint(0, config.vocab_size, (1, 64))
    with torch.no_grad():
        assert (llama(ids).logits - model(ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        llama3_scaling(32),
    ],
    ids=["linear", "llama3"],
)
def test_rope_scaling_round_trips_through_stock_transformers(tmp_path, realistic_model, scaling):
    config = get_preset("micro").replace(rope_scaling=scaling, rope_theta=5e5)
    model = realistic_model(config)
    save_checkpoint(model, config, tmp_path / "ckpt")
    export_llama(tmp_path / "ckpt", tmp_path / "llama")
    written = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert written["rope_parameters"] == {**scaling, "rope_theta": 5e5}
    ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids)
    assert (_stock_logits(tmp_path, tmp_path / "llama", ids) - want).abs().max().item() <= 1e-4
    import_hf(tmp_path / "llama", tmp_path / "back")
    assert load_model(tmp_path / "back").config == config


def test_bad_input(tmp_path, rel):
    with pytest.raises(MobiLlamaError, match="checkpoint not found"):
        export_llama(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MobiLlamaError, match="not a checkpoint directory"):
        export_llama(tmp_path / "empty", tmp_path / "out")
    original = rel.stock_llama(shared=True)
    src = rel.write_release(tmp_path / "release", rel.release_state(original), rel.release_config(original))
    with pytest.raises(MobiLlamaError, match="convert from-hf"):  # a Llama dir: import it first
        export_llama(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not rel.leftovers(tmp_path, "out")

    import_hf(src, tmp_path / "project")
    with pytest.raises(MobiLlamaError, match="unknown dtype"):
        export_llama(tmp_path / "project", tmp_path / "out", dtype="int4")
    (tmp_path / "out").mkdir()
    with pytest.raises(MobiLlamaError, match="already exists"):
        export_llama(tmp_path / "project", tmp_path / "out")
    weights = tmp_path / "project" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(MobiLlamaError, match="not a readable safetensors file"):
        export_llama(tmp_path / "project", tmp_path / "out2")
    assert not (tmp_path / "out2").exists() and not rel.leftovers(tmp_path, "out2")
