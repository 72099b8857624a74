"""The server with a SmolLM2-style (ChatML) checkpoint: chat prompts carry exactly one <|im_start|> in front,
plain completions get no BOS, replies end at <|im_end|> (not shown), a template that raises is a 400."""

from __future__ import annotations

import json

import httpx
import pytest

from mobillama.infer.load import load_checkpoint_tokenizer, load_for_inference

from .conftest import live

IM_START, IM_END = 1, 2
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def smol_model(smol_checkpoint):
    return load_for_inference(smol_checkpoint, dtype="fp32")


@pytest.fixture
def smol_generator(smol_model, smol_checkpoint, scripted_generator):
    """A real Generator over the ChatML checkpoint whose model answers "Hello there<|im_end|> and more"."""
    tok = load_checkpoint_tokenizer(smol_checkpoint)
    script = [*tok.encode("Hello there"), IM_END, *tok.encode(" and more")]
    return scripted_generator(smol_model, tok, script)


def test_chat_completion_prompt_has_one_im_start_and_the_reply_ends_at_im_end(smol_generator):
    tok = smol_generator.tokenizer
    with live(smol_generator) as server:
        body = {"messages": MESSAGES, "max_tokens": 20, "temperature": 0}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == ("Hello there", "stop")
        prompt = smol_generator.decoder.prompts[-1]
        assert prompt == tok.encode(tok.apply_chat_template(MESSAGES))  # no BOS added: it starts with one
        assert prompt[0] == IM_START and prompt[1] != IM_START
        assert r.json()["usage"]["prompt_tokens"] == len(prompt)
        stream = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30)
        chunks = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == "Hello there" and "<|im_end|>" not in stream.text


def test_plain_completion_gets_no_bos_for_a_chatml_tokenizer(smol_generator):
    tok = smol_generator.tokenizer
    with live(smol_generator) as server:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 20}, timeout=30)
        assert r.status_code == 200, r.text
        assert smol_generator.decoder.prompts[-1] == tok.encode("hello")
        assert r.json()["choices"][0]["text"] == "Hello there"


def test_a_chat_template_that_raises_is_a_400(smol_generator):
    smol_generator.tokenizer.hf.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with live(smol_generator) as server:
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES}, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "messages" and "\n" not in error["message"]
    assert error["message"] == (
        "the chat template failed to render these messages: Conversation roles must alternate"
    )
