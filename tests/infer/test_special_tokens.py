"""Special tokens at inference: BOS by the tokenizer's convention (SmolLM2's ChatML tokenizer adds none, a
project tokenizer adds <s>), chat prompts with exactly one <|im_start|> in front, and generation that ends
at any stop token (<|im_end|>, <|endoftext|>, generation_config ids) without showing it."""

from __future__ import annotations

import io
import json

import pytest

from mobillama.infer.chat import chat_loop, fit_history
from mobillama.infer.generator import Generator
from mobillama.infer.load import load_checkpoint_tokenizer, load_for_inference
from mobillama.infer.sampling import CHAT_STOP_STRINGS, SamplingParams, chat_stop_strings

IM_START, IM_END, END_OF_TEXT = 1, 2, 0


@pytest.fixture(scope="module")
def smol(smol_checkpoint):
    model = load_for_inference(smol_checkpoint, dtype="fp32")
    return model, load_checkpoint_tokenizer(smol_checkpoint)


@pytest.fixture
def scripted(scripted_generator):
    def make(smol, script: list[int]) -> Generator:
        return scripted_generator(*smol, script)

    return make


def test_plain_prompts_get_no_bos_for_a_chatml_tokenizer_and_bos_for_a_project_one(smol, tiny_checkpoint):
    model, tok = smol
    assert Generator(model, tok).encode_prompts("hello world") == [tok.encode("hello world")]
    project = load_checkpoint_tokenizer(tiny_checkpoint)
    ids = Generator(load_for_inference(tiny_checkpoint, dtype="fp32"), project).encode_prompts("def f")[0]
    assert ids == [1, *project.encode("def f")]  # <s> first, as the project's tokenizers always had


def test_a_rendered_chat_prompt_starts_with_exactly_one_im_start(smol):
    model, tok = smol
    gen = Generator(model, tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    ids = gen.encode_prompts(prompt)[0]
    system = tok.encode("system")
    assert ids[: 1 + len(system)] == [IM_START, *system] and ids.count(IM_START) == 3
    ids, dropped = fit_history(gen, [{"role": "user", "content": "hello"}], None, room=8)
    assert ids[0] == IM_START and ids[1] != IM_START and dropped == 0
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_generation_stops_at_im_end_and_does_not_show_it(smol, scripted):
    _, tok = smol
    hello, more = tok.encode("Hello there"), tok.encode(" and more")
    gen = scripted(smol, [*hello, IM_END, *more])
    deltas: list[str] = []
    out = gen.generate("hi", SamplingParams(max_new_tokens=20), on_text=lambda _, d: deltas.append(d))[0]
    assert (out.text, out.finish_reason) == ("Hello there", "stop")
    assert out.token_ids == hello and out.completion_tokens == len(hello) + 1
    assert "".join(deltas) == "Hello there" and "<|im_end|>" not in out.text
    # <|endoftext|> (a document ends) stops too; stop_at_eos=False runs on through both
    gen = scripted(smol, [*hello, END_OF_TEXT, *more])
    assert gen.generate("hi", SamplingParams(max_new_tokens=20))[0].token_ids == hello
    gen = scripted(smol, [*hello, IM_END, *more])
    free = gen.generate("hi", SamplingParams(max_new_tokens=len(hello) + 3, stop_at_eos=False))[0]
    assert free.finish_reason == "length" and free.token_ids[len(hello)] == IM_END


def test_generation_config_eos_ids_stop_generation(
    smol_tokenizer_dir, smol_builders, scripted_generator, tmp_path
):
    ckpt = smol_builders["checkpoint"](tmp_path / "ckpt", smol_tokenizer_dir)
    config = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [IM_END, 7]}))
    tok = load_checkpoint_tokenizer(ckpt)
    assert 7 in tok.stop_ids
    hello = tok.encode("Hello")
    gen = scripted_generator(load_for_inference(ckpt, dtype="fp32"), tok, [*hello, 7, *hello])
    out = gen.generate("hi", SamplingParams(max_new_tokens=10))[0]
    assert (out.token_ids, out.finish_reason) == (hello, "stop")


def test_chat_loop_with_chatml_stops_at_im_end_without_the_mobillama_stop_string(smol, scripted):
    _, tok = smol
    assert chat_stop_strings(tok) == () and CHAT_STOP_STRINGS[0] == "### Human:"
    # "### Human:" is ordinary text for a ChatML model: the reply keeps it and ends at <|im_end|>
    reply = tok.encode("Sure ### Human: x")
    gen = scripted(smol, [*reply, IM_END])
    out = io.StringIO()
    history = chat_loop(gen, SamplingParams(max_new_tokens=30), io.StringIO("hello\n"), out)
    assert history[-1] == {"role": "assistant", "content": "Sure ### Human: x"}
    assert "<|im_end|>" not in out.getvalue()
    prompt = gen.decoder.prompts[0]
    assert prompt[0] == IM_START and prompt[1] != IM_START


def test_chat_loop_reports_a_template_that_fails_and_keeps_going(smol_tokenizer_dir, smol):
    model, _ = smol
    from mobillama.tokenizer import load_tokenizer

    tok = load_tokenizer(smol_tokenizer_dir)
    tok.hf.chat_template = "{{ raise_exception('only one message allowed') }}"
    out = io.StringIO()
    history = chat_loop(Generator(model, tok), SamplingParams(max_new_tokens=2), io.StringIO("a\nb\n"), out)
    assert history == []
    assert out.getvalue().count("only one message allowed; not sent") == 2
