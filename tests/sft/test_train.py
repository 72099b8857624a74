"""SFT runs through the training loop: checkpoints with the chat template, resume, LoRA, merge, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mobillama.cli import main
from mobillama.errors import MobiLlamaError
from mobillama.sft.masking import IGNORE_INDEX, tokenize_conversation
from mobillama.sft.recipe import SFTRecipe, parse_lora_spec
from mobillama.sft.train import apply_lora, assistant_token_loss, merge_lora, run_sft
from mobillama.train.recipe import load_recipe

write_sft_recipe = None  # set from the conftest fixture below


@pytest.fixture(scope="module")
def small_data(instruction_set, tmp_path_factory):
    """The first conversations of the stdlib set: enough for a few steps, quick to tokenise."""
    out = tmp_path_factory.mktemp("small")
    for name, n in (("train", 48), ("heldout", 8)):
        lines = (instruction_set / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture(autouse=True)
def _writer(sft_recipe_writer):
    global write_sft_recipe
    write_sft_recipe = sft_recipe_writer


def recipe_for(tmp_path, base, data_dir, name="run", overrides=(), **sections):
    path = write_sft_recipe(
        tmp_path / f"{name}.yaml",
        base,
        data_dir / "train.jsonl",
        out_dir=tmp_path / name,
        val=data_dir / "heldout.jsonl",
        **sections,
    )
    return load_recipe(path, list(overrides), cls=SFTRecipe)


def runs_of_labels(tokenizer, example):
    """The decoded text of each contiguous run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.hf.decode(r) for r in runs]


# --- masking with the project's real tokenizer and MOBILLAMA_CHAT_TEMPLATE ----------------------------------


def test_label_mask_with_the_real_chat_template(project_tokenizer):
    from mobillama.tokenizer import MOBILLAMA_CHAT_TEMPLATE

    tok, _ = project_tokenizer
    assert tok.hf.chat_template == MOBILLAMA_CHAT_TEMPLATE
    conv = [
        {"role": "user", "content": "What does `json.dumps` do?"},
        {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
        {"role": "user", "content": "And `json.loads`?"},
        {"role": "assistant", "content": "Deserialize s to a Python object."},
    ]
    ex = tokenize_conversation(tok, conv, 10_000)
    assert ex.input_ids[0] == tok.bos_id and ex.input_ids[-1] == tok.eos_id
    runs = runs_of_labels(tok, ex)
    assert len(runs) == 2
    for run, turn in zip(runs, (conv[1], conv[3])):
        assert run.endswith("</s>")
        assert run.removesuffix("</s>").strip(" :") == turn["content"]
    prompt_text = tok.hf.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE_INDEX])
    assert "### Human: What does `json.dumps` do?" in prompt_text and "curious human" in prompt_text
    assert "Serialize" not in prompt_text

    # truncated inside the second user turn: ends on the first reply's </s>, never on a dangling prompt
    first_end = ex.input_ids.index(tok.eos_id) + 1
    cut = tokenize_conversation(tok, conv, first_end + 3)
    assert cut.input_ids == ex.input_ids[:first_end] and cut.labels == ex.labels[:first_end]
    assert tokenize_conversation(tok, conv, 5) is None  # nothing of the reply survives


# --- runs ---------------------------------------------------------------------------------------------------


def test_full_sft_run_checkpoint_carries_template_and_resume_is_exact(base_checkpoint, small_data, tmp_path):
    from transformers import AutoTokenizer

    from mobillama.hf import MobiLlamaForCausalLM
    from mobillama.tokenizer import MOBILLAMA_CHAT_TEMPLATE

    recipe = recipe_for(tmp_path, base_checkpoint, small_data, train={"max_steps": 4})
    assert recipe.optim.warmup_ratio == 0.1
    summary = run_sft(recipe, say=lambda _m: None)
    assert summary["step"] == 4 and summary["val_loss"] is not None
    run = tmp_path / "run"
    final = run / "checkpoints" / "step-00000004"
    assert (
        json.loads((final / "tokenizer_config.json").read_text())["chat_template"] == MOBILLAMA_CHAT_TEMPLATE
    )
    hf_tok = AutoTokenizer.from_pretrained(str(final))
    assert hf_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    ).endswith("### Human: hi\n### Assistant:")
    MobiLlamaForCausalLM.from_pretrained(str(final))  # a plain project checkpoint
    run_info = json.loads((run / "run.json").read_text())
    assert run_info["warmup_steps"] == 1 and run_info["data"]["train_load"]["kept"] == 48
    assert json.loads((run / "data_report.json").read_text())["train_encode"]["examples"] == 48
    heldout = assistant_token_loss(final, small_data / "heldout.jsonl", max_length=160)
    val_encode = json.loads((run / "data_report.json").read_text())["val_encode"]
    assert heldout["tokens"] == val_encode["target_tokens"] and 0 < heldout["loss"] < 20
    base_weights = load_file(str(base_checkpoint / "model.safetensors"))
    trained = load_file(str(final / "model.safetensors"))
    assert any(not torch.equal(base_weights[k], trained[k]) for k in trained)

    # stop-and-resume: drop the last checkpoint and continue from step 3 -> identical final weights
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    again = recipe_for(tmp_path, base_checkpoint, small_data, name="resumed", train={"max_steps": 4})
    with pytest.raises(MobiLlamaError, match="--resume auto"):
        run_sft(again, say=lambda _m: None)
    assert run_sft(again, resume="auto", say=lambda _m: None)["step"] == 4
    redone = load_file(str(resumed / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert trained.keys() == redone.keys()
    for k in trained:
        assert torch.equal(trained[k], redone[k]), k


def test_epochs_and_packing_derive_the_schedule(base_checkpoint, small_data, tmp_path):
    recipe = recipe_for(
        tmp_path,
        base_checkpoint,
        small_data,
        train={"max_steps": 0, "epochs": 0.5},
        data={"packing": True},
        checkpoint={"every_steps": 100},
    )
    summary = run_sft(recipe, say=lambda _m: None)
    # 48 conversations / (4 x 2) = 6 steps per epoch; half an epoch = 3 steps
    assert summary["step"] == 3 and recipe.optim.warmup_steps == 1


def test_compiled_sft_trains_like_eager(base_checkpoint, small_data, tmp_path):
    """Recipe key model.compile (layers and cross-entropy compiled) on packed rows: eager's losses."""
    from mobillama.train.metrics import read_metrics

    losses = {}
    for flag in (False, True):
        recipe = recipe_for(
            tmp_path,
            base_checkpoint,
            small_data,
            name=f"compile-{flag}",
            train={"max_steps": 2},
            model={"compile": flag},
            data={"packing": True},
            checkpoint={"every_steps": 100},
        )
        run_sft(recipe, say=lambda _m: None)
        losses[flag] = [r["loss"] for r in read_metrics(tmp_path / f"compile-{flag}") if "loss" in r]
    assert len(losses[True]) == 2 and losses[True] == pytest.approx(losses[False], rel=1e-4)


# --- LoRA ---------------------------------------------------------------------------------------------------

TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def test_lora_gives_the_shared_ffn_one_adapter(base_checkpoint):
    from mobillama.hf import MobiLlamaForCausalLM
    from mobillama.sft.recipe import LoraSection

    hf = MobiLlamaForCausalLM.from_pretrained(str(base_checkpoint))
    layers = hf.config.num_hidden_layers
    assert layers > 1 and len(hf.model.ffns) == 1
    lora = LoraSection(r=4, alpha=8, dropout=0.0, targets=TARGETS)
    model = apply_lora(hf, lora)
    adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    ffn = sorted(n for n in adapted if ".ffns." in n)
    attn = [n for n in adapted if ".self_attn." in n]
    assert [n.split("ffns.")[1] for n in ffn] == ["0.down_proj", "0.gate_proj", "0.up_proj"]
    assert len(attn) == 2 * layers and len(adapted) == 2 * layers + 3
    h, inter = hf.config.hidden_size, hf.config.intermediate_size
    kv = hf.config.num_key_value_heads * (h // hf.config.num_attention_heads)
    expected = layers * 4 * ((h + h) + (h + kv)) + 4 * ((h + inter) * 2 + (inter + h))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected


def test_lora_merge_matches_unmerged_logits(base_checkpoint, tmp_path):
    from mobillama.checkpoint import load_model
    from mobillama.hf import MobiLlamaForCausalLM
    from mobillama.sft.recipe import LoraSection

    model = apply_lora(
        MobiLlamaForCausalLM.from_pretrained(str(base_checkpoint)),
        LoraSection(r=4, alpha=8, dropout=0.0, targets=TARGETS),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B starts at zero: make the adapter actually change the model
    adapter = tmp_path / "adapter"
    model.save_pretrained(str(adapter))
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        base_logits = MobiLlamaForCausalLM.from_pretrained(str(base_checkpoint)).eval()(input_ids=ids).logits
    assert (unmerged - base_logits).abs().max() > 1e-3
    assert (
        main(
            [
                "lora",
                "merge",
                "--base",
                str(base_checkpoint),
                "--adapter",
                str(adapter),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    merged = load_model(tmp_path / "m")
    with torch.no_grad():
        assert (merged(ids) - unmerged).abs().max() <= 1e-4
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    with pytest.raises(MobiLlamaError, match="not a LoRA adapter"):
        merge_lora(base_checkpoint, tmp_path / "m", tmp_path / "m2")


def test_lora_run_saves_adapters_and_resumes_exactly(base_checkpoint, small_data, tmp_path):
    overrides = parse_lora_spec("r=4,alpha=8,dropout=0.0,targets=q_proj+v_proj+gate_proj+up_proj+down_proj")

    def lora_recipe(name: str) -> SFTRecipe:
        return recipe_for(
            tmp_path,
            base_checkpoint,
            small_data,
            name=name,
            overrides=overrides,
            train={"max_steps": 2},
            checkpoint={"every_steps": 1},
        )

    recipe = lora_recipe("run")
    assert recipe.lora.targets == TARGETS
    run_sft(recipe, say=lambda _m: None)
    final = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    assert not (final / "model.safetensors").exists()
    shutil.rmtree(final)
    run_sft(lora_recipe("run"), resume="auto", say=lambda _m: None)
    redone = load_file(str(final / "adapter_model.safetensors"))
    # a second, uninterrupted run gives the same adapter
    run_sft(lora_recipe("fresh"), say=lambda _m: None)
    reference = load_file(
        str(tmp_path / "fresh" / "checkpoints" / "step-00000002" / "adapter_model.safetensors")
    )
    assert reference.keys() == redone.keys() and any("ffns.0" in k for k in reference)
    for k in reference:
        assert torch.equal(reference[k], redone[k]), k


def test_cli_lora_run_then_merge(base_checkpoint, small_data, tmp_path):
    from mobillama.checkpoint import load_model

    path = write_sft_recipe(
        tmp_path / "r.yaml", base_checkpoint, small_data / "train.jsonl", out_dir=tmp_path / "run"
    )
    args = [
        "sft",
        "--recipe",
        str(path),
        "--lora",
        "r=2,alpha=4,targets=q_proj+down_proj",
        "--train.max_steps=1",
    ]
    assert main(args) == 0
    adapter = tmp_path / "run" / "checkpoints" / "step-00000001"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 2 and sorted(config["target_modules"]) == ["down_proj", "q_proj"]
    out = tmp_path / "merged"
    assert (
        main(["lora", "merge", "--base", str(base_checkpoint), "--adapter", str(adapter), "--out", str(out)])
        == 0
    )
    assert load_model(out).config == load_model(base_checkpoint).config
    assert (
        main(["lora", "merge", "--base", str(base_checkpoint), "--adapter", str(adapter), "--out", str(out)])
        == 2
    )


# --- bad input ----------------------------------------------------------------------------------------------


def test_bad_conversations_are_counted_in_the_run_log(base_checkpoint, small_data, tmp_path):
    good = (small_data / "train.jsonl").read_text(encoding="utf-8")
    bad = [
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]},
        {"messages": []},
    ]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(good + "".join(json.dumps(b) + "\n" for b in bad) + "{oops\n")
    shutil.copy(small_data / "heldout.jsonl", data / "heldout.jsonl")
    logs: list[str] = []
    run_sft(recipe_for(tmp_path, base_checkpoint, data, train={"max_steps": 1}), say=logs.append)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["train_load"]
    assert report["kept"] == 48
    assert report["skipped"] == {
        "no assistant turn": 2,
        "unknown role 'robot'": 1,
        "empty message": 1,
        "not a JSON object": 1,
    }
    assert any("skipped" in line and "no assistant turn" in line for line in logs)


def test_clear_errors(base_checkpoint, small_data, tmp_path, capsys):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
        + "\n"
        + json.dumps({"instruction": "a", "input": "", "output": "b"})
        + "\n"
    )
    with pytest.raises(MobiLlamaError, match="one file must use one format"):
        run_sft(recipe_for(tmp_path, base_checkpoint, small_data, overrides=[f"data.train={mixed}"]))
    with pytest.raises(MobiLlamaError, match="base checkpoint .* not found"):
        run_sft(recipe_for(tmp_path, tmp_path / "nope", small_data))
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(base_checkpoint / name, bare / name)
    with pytest.raises(MobiLlamaError, match="has no tokenizer files"):
        run_sft(recipe_for(tmp_path, bare, small_data))
    assert not (tmp_path / "run").exists()

    path = write_sft_recipe(
        tmp_path / "r.yaml", base_checkpoint, small_data / "train.jsonl", out_dir=tmp_path / "x"
    )
    for args, key in (
        (["--data.formatt=x"], "data.formatt"),
        (["--train.epochs=many"], "train.epochs"),
        (["--lora", "r=4,targets=q_proj+ffn"], "lora.targets"),
        (["--lora", "rank=4"], "rank=4"),
        (["--lora.r=0"], "lora.r"),
        (["--data.format=csv"], "data.format"),
        (["--optim.warmup_ratio=1.5"], "optim.warmup_ratio"),
    ):
        assert main(["sft", "--recipe", str(path), *args]) == 2
        assert key in capsys.readouterr().err
    assert main(["sft"]) == 2
    assert "--recipe" in capsys.readouterr().err


def test_build_data_cli(tmp_path, capsys):
    assert main(["sft", "build-data", "--out", str(tmp_path / "d")]) == 0
    assert "held-out" in capsys.readouterr().out
    first = json.loads((tmp_path / "d" / "heldout.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]


def test_sft_takes_shape_and_tokenizer_from_a_tied_base(project_tokenizer, small_data, tmp_path):
    """A SmolLM2-like base (tied embeddings, GQA, one FFN per layer): no shape is stated in the recipe;
    the run's checkpoints keep the base's config, store the tied table once and carry its tokenizer."""
    from mobillama.checkpoint import load_checkpoint, save_checkpoint
    from mobillama.config import get_preset
    from mobillama.model import MobiLlama

    tok, tok_dir = project_tokenizer
    config = get_preset("micro").replace(
        vocab_size=tok.vocab_size, max_position_embeddings=256, num_hidden_layers=2, num_key_value_heads=1,
        ffn_sharing="none", tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    base = save_checkpoint(MobiLlama(config), config, tmp_path / "tied-base", tokenizer_dir=tok_dir)
    recipe = recipe_for(tmp_path, base, small_data, train={"max_steps": 2})
    assert run_sft(recipe, say=lambda _m: None)["step"] == 2
    final = tmp_path / "run" / "checkpoints" / "step-00000002"
    trained_config, state = load_checkpoint(final)
    assert trained_config == config and "lm_head.weight" not in state
    assert (final / "tokenizer.json").is_file()
