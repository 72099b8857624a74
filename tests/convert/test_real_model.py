"""The real pretrained SmolLM2-135M-Instruct, imported from its GGUF file, against llama.cpp on the same file.

These tests use the real model (fetched once into the cache by the ``real_model`` fixture) and, where
built, llama.cpp's own tools (``scripts/build_llama_cpp.sh``): the same token ids, the same perplexity on
real text with llama.cpp's windowing, the same greedy continuations, and an exported GGUF that llama.cpp
runs at the original file's perplexity. Random weights would pass most of these even with a wrong
tokenizer flag or template; real weights do not.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from mobillama.checkpoint import load_checkpoint, load_model
from mobillama.eval import llama_cpp
from mobillama.eval.perplexity import windowed_perplexity
from mobillama.tokenizer import load_tokenizer

PPL_WINDOWS = 16  # windows of 512 tokens: 4,080 scored tokens


@pytest.fixture(scope="module")
def model(real_model):
    return load_model(real_model[1]).eval()


@pytest.fixture(scope="module")
def tok(real_model):
    return load_tokenizer(real_model[1])


def _varied_texts(real_text: str) -> list[str]:
    """A few thousand words: English prose, Python code, numbers, whitespace runs, non-ASCII."""
    import json as json_module

    code = inspect.getsource(json_module.decoder)
    return [
        real_text[:12_000],
        real_text[200_000:206_000],
        code[:8_000],
        "In 1984, 12345 people paid $3.50 (or €2,99) each — 100% of them; 2nd/3rd place: 42.",
        "  leading spaces,\ttabs\t\tand\n\n\nnewlines   \n  trailing  ",
        "naïve café résumé Ångström 日本語のテキスト 中文 한국어 Ελληνικά русский 🙂👍🏽 ﬁ ² ½",
        "It's they're we've I'm you'll he'd 'quoted' \"double\" `back` — –",
        "def f(x):\n    return x**2  # square\n\nclass A:\n\tpass\n",
    ]


def test_import_reads_the_files_shape_tokenizer_and_template(real_model, tok):
    config, state = load_checkpoint(real_model[1])
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert (config.vocab_size, config.max_position_embeddings) == (49152, 8192)
    assert config.tie_word_embeddings and "lm_head.weight" not in state
    assert (config.rope_theta, config.rms_norm_eps, config.ffn_sharing) == (100000.0, 1e-5, "none")
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    tok_config = json.loads((real_model[1] / "tokenizer_config.json").read_text())
    assert tok_config["add_bos_token"] is False
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


def test_token_ids_equal_llama_cpps(real_model, tok, llama_cpp_tools, real_text):
    words = 0
    for text in _varied_texts(real_text):
        want = llama_cpp.tokenize(real_model[0], text)
        got = tok.encode(text, parse_special=False)
        assert got == want, text[:80]
        words += len(text.split())
    assert words > 3000


def test_special_tokens_in_prompts_are_parsed_like_llama_cpp(real_model, tok, llama_cpp_tools):
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert tok.encode(prompt) == llama_cpp.tokenize(real_model[0], prompt, parse_special=True)
    assert tok.encode(prompt)[0] == 1 and tok.encode(prompt).count(1) == 3  # one <|im_start|> per turn


def test_perplexity_within_half_a_percent_of_llama_cpps(
    tmp_path, real_model, model, tok, llama_cpp_tools, real_text
):
    text = real_text[:120_000]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    theirs = llama_cpp.perplexity(real_model[0], tmp_path / "text.txt", ctx=512, chunks=PPL_WINDOWS)
    ours = windowed_perplexity(model, tok.encode(text, parse_special=False), ctx=512, max_windows=PPL_WINDOWS)
    print(f"perplexity: ours {ours['perplexity']:.4f}, llama.cpp {theirs['perplexity']:.4f}")
    assert 5 < ours["perplexity"] < 40  # a real model on real text, not noise
    assert abs(ours["perplexity"] / theirs["perplexity"] - 1) < 0.005


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village,",
]


@pytest.fixture(scope="module")
def f32_gguf(real_model, tmp_path_factory, llama_cpp_tools):
    """The imported model exported as F32: llama.cpp then computes in float32 as this project does
    (on the Q4_1 file it rounds activations to 8 bits, which moves near-tied logits by ~0.2)."""
    from mobillama.convert import export_gguf

    path = tmp_path_factory.mktemp("f32") / "model-f32.gguf"
    export_gguf(real_model[1], path, gguf_type="f32")
    return path


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_equals_llama_cpps_for_32_tokens(f32_gguf, model, tok, prompt):
    from mobillama.infer.generator import Generator
    from mobillama.infer.sampling import SamplingParams

    theirs = llama_cpp.greedy(f32_gguf, prompt, 32)
    ids = tok.encode(prompt)
    out = Generator(model, tok).generate_ids([ids], SamplingParams(max_new_tokens=32))[0]
    assert len(out.token_ids) >= 8  # a real continuation, not an immediate stop
    assert out.text == theirs  # both stop at the same end-of-turn token, or run all 32 tokens


def test_exported_gguf_runs_in_llama_cpp_at_the_originals_perplexity(
    tmp_path, real_model, tok, llama_cpp_tools, real_text
):
    import gguf

    from mobillama.convert import export_gguf

    export_gguf(real_model[1], tmp_path / "export.gguf", gguf_type="f16")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "export.gguf").fields.items()}
    assert fields["tokenizer.ggml.pre"] == "smollm" and fields["tokenizer.ggml.add_bos_token"] is False
    text = real_text[:120_000]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    sample = _varied_texts(real_text)[0]
    assert llama_cpp.tokenize(tmp_path / "export.gguf", sample) == llama_cpp.tokenize(real_model[0], sample)
    original = llama_cpp.perplexity(real_model[0], tmp_path / "text.txt", chunks=PPL_WINDOWS)
    exported = llama_cpp.perplexity(tmp_path / "export.gguf", tmp_path / "text.txt", chunks=PPL_WINDOWS)
    print(f"llama.cpp perplexity: original {original['perplexity']:.4f}, export {exported['perplexity']:.4f}")
    assert abs(exported["perplexity"] / original["perplexity"] - 1) < 0.005


def test_k_quant_file_imports_at_llama_cpps_perplexity(tmp_path, real_model, tok, llama_cpp_tools, real_text):
    """A K-quant (Q4_K_M, made by llama.cpp's own quantizer) imports and scores as llama.cpp scores it."""
    from mobillama.convert import export_gguf
    from mobillama.convert.from_gguf import import_gguf

    export_gguf(real_model[1], tmp_path / "f16.gguf", gguf_type="f16")
    llama_cpp.quantize(tmp_path / "f16.gguf", tmp_path / "q4k.gguf", "Q4_K_M")
    report = import_gguf(tmp_path / "q4k.gguf", tmp_path / "q4k")
    assert any("Q4_K" in n for n in report.notices)
    text = real_text[:60_000]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    theirs = llama_cpp.perplexity(tmp_path / "q4k.gguf", tmp_path / "text.txt", chunks=8)
    with torch.no_grad():
        ours = windowed_perplexity(
            load_model(tmp_path / "q4k").eval(), tok.encode(text, parse_special=False), max_windows=8
        )
    print(f"Q4_K_M perplexity: ours {ours['perplexity']:.4f}, llama.cpp {theirs['perplexity']:.4f}")
    assert abs(ours["perplexity"] / theirs["perplexity"] - 1) < 0.01


def test_int4_group_32_holds_the_q4_1_blocks_of_the_file_without_loss(model):
    """The shipped file is Q4_1 (blocks of 32: w = q * d + m, d and m half floats) in every linear layer.
    The project's int4 g32 (asymmetric, half-float scale and offset) is the same grid: quantizing the
    imported weights recovers each block's codes, scale and offset, so `mobillama quantize --bits 4` of
    this model adds no weight error at all (what remains is the kernel's int8 activations)."""
    from mobillama.infer.quant import Int4Linear

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(layers) == 30 * 7
    for name, linear in layers:
        w = linear.weight.detach().float()
        back = Int4Linear.from_linear(linear, 32).dequantize()
        assert (back - w).abs().max() <= 1e-6 * w.abs().max(), name
