"""Recipes: shipped ones load; malformed ones fail naming the key; overrides are validated the same way."""

from __future__ import annotations

import pytest

from mobillama.errors import MobiLlamaError
from mobillama.train.recipe import available_recipes, load_recipe, recipe_from_dict

PAPER = ["mobillama-0.5b", "mobillama-0.8b", "large-base-1.2b", "baseline1-0.5b", "baseline2-0.5b"]


def test_shipped_recipes_have_the_papers_hyperparameters():
    assert set(PAPER + ["tiny-cpu"]) <= set(available_recipes())
    for name in PAPER:
        r = load_recipe(name)
        assert (r.optim.lr, r.optim.min_lr, r.optim.betas) == (3e-4, 3e-5, [0.9, 0.95])
        assert (r.optim.weight_decay, r.optim.grad_clip, r.optim.warmup_steps) == (0.1, 1.0, 2000)
        assert r.train.precision == "bf16" and r.optim.no_decay == ["norms"]
        assert r.batch.global_batch_tokens % (r.batch.micro_batch_size * 2048) == 0
        assert r.model_config().max_position_embeddings >= 2048
    assert load_recipe("mobillama-0.5b").model_config().ffn_sharing == "all"
    assert load_recipe("large-base-1.2b").model_config().ffn_sharing == "none"


def test_overrides_apply_and_are_typed():
    r = load_recipe(
        "tiny-cpu", ["--optim.lr=1e-2", "train.max_steps=7", "--model.overrides.num_hidden_layers=2"]
    )
    assert r.optim.lr == 0.01 and r.train.max_steps == 7 and r.model_config().num_hidden_layers == 2


@pytest.mark.parametrize(
    "data, key",
    [
        ({"optim": {"weight_decy": 0.1}}, "optim.weight_decy"),
        ({"trian": {}}, "trian"),
        ({"train": {"max_steps": "ten"}}, "train.max_steps"),
        ({"train": {"max_steps": 1.5}}, "train.max_steps"),
        ({"optim": {"betas": 0.9}}, "optim.betas"),
        ({"optim": {"lr": True}}, "optim.lr"),
        ({"train": {"precision": "fp8"}}, "train.precision"),
        ({"optim": {"no_decay": ["bias"]}}, "optim.no_decay"),
        ({"batch": {"micro_batch_size": 0}}, "batch.micro_batch_size"),
        ({"model": {"overrides": {"hiden_size": 3}}}, "hiden_size"),
        ({"model": "tiny"}, "model"),
    ],
)
def test_malformed_recipe_names_the_key(data, key):
    with pytest.raises(MobiLlamaError, match=key.replace(".", r"\.")):
        recipe_from_dict(data)


def test_bad_files(tmp_path):
    with pytest.raises(MobiLlamaError, match="neither a file nor a shipped recipe"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(MobiLlamaError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("")
    with pytest.raises(MobiLlamaError, match="empty recipe"):
        load_recipe(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(MobiLlamaError, match="mapping"):
        load_recipe(bad)
    with pytest.raises(MobiLlamaError, match="section.key=value"):
        load_recipe("tiny-cpu", ["--optim.lr"])
