"""``pretrain --init-from CKPT`` (and ``model.init_from``): the model's shape and tokenizer come from the
checkpoint (an imported SmolLM2-like model: tied embeddings, GQA, one FFN per layer), not the recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mobillama.checkpoint import load_checkpoint, save_checkpoint
from mobillama.cli import main
from mobillama.config import ModelConfig, get_preset
from mobillama.errors import MobiLlamaError
from mobillama.model import MobiLlama
from mobillama.train.metrics import read_metrics
from mobillama.train.pretrain import choose_tokenizer_dir
from mobillama.train.recipe import recipe_from_dict


def word_tokenizer(out: Path, size: int, word: str = "w") -> Path:
    """A word-level tokenizer of exactly ``size`` tokens (<unk>, <s>, </s>, then words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"{word}{i}": i for i in range(3, size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    return out


# Not the micro preset the recipe names: 2 layers, one KV head, FFN 96, no sharing, tied head.
SHAPE = dict(
    num_hidden_layers=2,
    num_key_value_heads=1,
    intermediate_size=96,
    ffn_sharing="none",
    tie_word_embeddings=True,
)


@pytest.fixture
def init_ckpt(tmp_path) -> Path:
    torch.manual_seed(1)
    config = get_preset("micro").replace(**SHAPE)
    tok = word_tokenizer(tmp_path / "ckpt-tok", config.vocab_size)
    return save_checkpoint(MobiLlama(config), config, tmp_path / "init", tokenizer_dir=tok)


def test_init_from_takes_the_shape_and_tokenizer_from_the_checkpoint(
    helpers, shard_dir, init_ckpt, tmp_path, capsys
):
    recipe = helpers.write_recipe(tmp_path / "r.yaml", helpers.micro_recipe(shard_dir, tmp_path / "run"))
    argv = ["pretrain", "--recipe", str(recipe), "--train.max_steps=2", "--init-from", str(init_ckpt)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "shape from --init-from" in out and "recipe preset 'micro' not used" in out
    init_config, init_state = load_checkpoint(init_ckpt)
    final = tmp_path / "run" / "checkpoints" / "step-00000002"
    config, _ = load_checkpoint(final)
    assert config == init_config
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118  (tied: stored once)
    assert (final / "tokenizer.json").read_bytes() == (init_ckpt / "tokenizer.json").read_bytes()
    assert "init_from: " in (tmp_path / "run" / "recipe.yaml").read_text()
    # training started from the checkpoint's weights
    from mobillama.data.loader import StepBatches, TokenSplit
    from mobillama.train.loop import lm_loss_sum

    model = MobiLlama(init_config)
    model.load_state_dict({**init_state, "lm_head.weight": init_state["model.embed_tokens.weight"]})
    batches = StepBatches(TokenSplit(shard_dir), micro_batch_size=4, grad_accum=2, seed=7).next_step()
    with torch.no_grad():
        expected = sum(float(lm_loss_sum(model, b)) for b in batches) / (8 * 16)
    first = next(r for r in read_metrics(tmp_path / "run") if "loss" in r)
    assert first["loss"] == pytest.approx(expected, rel=1e-5)


def test_the_recipe_key_works_like_the_option(helpers, shard_dir, init_ckpt, tmp_path):
    recipe = helpers.micro_recipe(
        shard_dir, tmp_path / "run", model={"preset": "tiny", "init_from": str(init_ckpt)}
    )
    path = helpers.write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["pretrain", "--recipe", str(path), "--train.max_steps=1"]) == 0
    config, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000001")
    assert config == ModelConfig.load(init_ckpt / "config.json")


def test_recipe_fields_that_contradict_the_checkpoint_are_one_line_errors(
    helpers, shard_dir, init_ckpt, tmp_path, capsys
):
    recipe = helpers.write_recipe(tmp_path / "r.yaml", helpers.micro_recipe(shard_dir, tmp_path / "run"))
    base = ["pretrain", "--recipe", str(recipe), "--train.max_steps=1", "--init-from", str(init_ckpt)]
    for override, field in (
        ("--model.overrides.num_hidden_layers=4", "num_hidden_layers"),
        ("--model.overrides.ffn_sharing=all", "ffn_sharing"),
        ("--model.overrides.tie_word_embeddings=false", "tie_word_embeddings"),
    ):
        assert main([*base, override]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        assert f"'model.overrides.{field}'" in err and "comes from the checkpoint" in err
    assert not (tmp_path / "run").exists()
    # fields that agree with the checkpoint are accepted
    data = helpers.micro_recipe(shard_dir, tmp_path / "run", model={"overrides": {"num_hidden_layers": 2}})
    config = recipe_from_dict(data).init_model_config(init_ckpt)
    assert config.num_hidden_layers == 2 and config.tie_word_embeddings


def test_bad_init_from_checkpoints(helpers, shard_dir, init_ckpt, tmp_path):
    recipe = recipe_from_dict(helpers.micro_recipe(shard_dir, tmp_path / "run"))
    with pytest.raises(MobiLlamaError, match="checkpoint not found"):
        recipe.init_model_config(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MobiLlamaError, match="not a checkpoint directory"):
        recipe.init_model_config(tmp_path / "empty")
    from mobillama.infer.quant_checkpoint import quantize_checkpoint

    quantize_checkpoint(init_ckpt, tmp_path / "q8", 8)
    with pytest.raises(MobiLlamaError, match="is a quantized checkpoint"):
        recipe.init_model_config(tmp_path / "q8")


def test_which_tokenizer_the_run_carries(shard_dir, init_ckpt, tmp_path):
    manifest = {"tokenizer": "tokenizer"}
    notes = []
    # the data has none: the checkpoint's
    assert choose_tokenizer_dir(shard_dir, manifest, init_ckpt, notes.append) == init_ckpt
    # without --init-from: the data's (here none)
    assert choose_tokenizer_dir(shard_dir, manifest, None, notes.append) is None
    # the data names the same tokenizer: the checkpoint's
    word_tokenizer(shard_dir / "tokenizer", 256)
    assert choose_tokenizer_dir(shard_dir, manifest, init_ckpt, notes.append) == init_ckpt
    assert not notes
    # another tokenizer with the same vocabulary size: the data's, with a notice
    other = tmp_path / "other-data"
    other.mkdir()
    word_tokenizer(other / "tokenizer", 256, word="x")
    assert choose_tokenizer_dir(other, manifest, init_ckpt, notes.append) == other / "tokenizer"
    assert len(notes) == 1 and "same vocab size 256" in notes[0]
    # another vocabulary size: refused
    small = tmp_path / "small-data"
    small.mkdir()
    word_tokenizer(small / "tokenizer", 200)
    with pytest.raises(MobiLlamaError, match="tokenizer of 200 tokens .* carries one of 256"):
        choose_tokenizer_dir(small, manifest, init_ckpt, notes.append)
