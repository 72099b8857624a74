"""The transformers shell: Auto* registration, save/load, generate() and pipelines on project checkpoints."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

import mobillama
from fixtures import llama3_scaling
from mobillama.checkpoint import load_model, save_checkpoint
from mobillama.config import get_preset
from mobillama.hf import MobiLlamaConfig, MobiLlamaForCausalLM


def test_auto_classes_load_a_project_checkpoint(tmp_path, seeded_model):
    cfg = get_preset("micro").replace(ffn_sharing="group:2")
    model = seeded_model(cfg)
    save_checkpoint(model, cfg, tmp_path / "ckpt")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "ckpt"), MobiLlamaConfig)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert isinstance(hf, MobiLlamaForCausalLM)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() == 0.0


def test_save_pretrained_round_trips_into_the_plain_model(tmp_path, seeded_model):
    cfg = get_preset("micro").replace(tie_word_embeddings=True)
    hf = MobiLlamaForCausalLM(MobiLlamaConfig.from_model_config(cfg)).eval()
    hf.save_pretrained(tmp_path / "out")
    plain = load_model(tmp_path / "out")
    assert plain.config == cfg
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    with torch.no_grad():
        assert (plain(ids) - hf(ids).logits).abs().max().item() == 0.0


def test_labels_give_the_shifted_mean_loss():
    cfg = get_preset("micro")
    hf = MobiLlamaForCausalLM(MobiLlamaConfig.from_model_config(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    out = hf(ids, labels=ids)
    ref = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1)
    )
    assert torch.allclose(out.loss, ref)


def test_generate_greedy_equals_argmax_loop_with_left_padding(seeded_model):
    cfg = get_preset("micro")
    model = seeded_model(cfg)
    hf = MobiLlamaForCausalLM(MobiLlamaConfig.from_model_config(cfg)).eval()
    hf.load_state_dict(model.state_dict())
    prompts = [torch.randint(3, cfg.vocab_size, (n,)) for n in (6, 3)]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, 6 - len(p) :], mask[b, 6 - len(p) :] = p, 1
    gen = GenerationConfig(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = hf.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
    for b, p in enumerate(prompts):  # reference: full forward, argmax, one token at a time
        seq = p.clone()
        with torch.no_grad():
            for _ in range(5):
                seq = torch.cat([seq, model(seq[None])[0, -1].argmax()[None]])
        assert out[b, 6:].tolist() == seq[len(p) :].tolist()


def test_text_generation_pipeline_runs_on_a_checkpoint(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(97 + i): 3 + i for i in range(26)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    cfg = get_preset("micro").replace(vocab_size=len(vocab))
    hf = MobiLlamaForCausalLM(MobiLlamaConfig.from_model_config(cfg))
    hf.save_pretrained(tmp_path / "ck")
    fast.save_pretrained(tmp_path / "ck")
    pipe = pipeline("text-generation", model=str(tmp_path / "ck"), device="cpu")
    out = pipe("abc", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("abc")


def test_package_exports():
    for name in (
        "MobiLlama",
        "MobiLlamaConfig",
        "MobiLlamaForCausalLM",
        "ModelConfig",
        "load_model",
        "PRESETS",
    ):
        assert hasattr(mobillama, name)


def test_config_fields_and_defaults_are_model_configs():
    """MobiLlamaConfig declares every ModelConfig field from the dataclass: same defaults, and a config
    built from any ModelConfig converts back to an equal one."""
    import dataclasses

    from mobillama.config import ModelConfig

    hf_default = MobiLlamaConfig()
    for f in dataclasses.fields(ModelConfig):
        assert getattr(hf_default, f.name) == f.default, f.name
    assert hf_default.to_model_config() == ModelConfig()
    cfg = get_preset("micro").replace(ffn_sharing="group:2", rope_theta=5e5, tie_word_embeddings=True)
    assert MobiLlamaConfig.from_model_config(cfg).to_model_config() == cfg


def test_rope_scaling_survives_save_pretrained(tmp_path):
    """transformers has its own ``rope_scaling`` property; MobiLlamaConfig's field must shadow it intact."""
    scaling = llama3_scaling(64)
    cfg = get_preset("micro").replace(rope_scaling=scaling)
    MobiLlamaConfig.from_model_config(cfg).save_pretrained(tmp_path)
    assert MobiLlamaConfig.from_pretrained(tmp_path).to_model_config() == cfg
