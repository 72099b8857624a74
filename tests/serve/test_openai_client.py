"""The official ``openai`` client, unchanged, against a real server over a real micro checkpoint."""

from __future__ import annotations

import httpx
import openai
import pytest

from mobillama.infer.sampling import SamplingParams, chat_stop_strings

from .conftest import live

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def server(real_generator):
    with live(real_generator, api_key=KEY, model_name="micro", max_concurrency=2) as s:
        yield s


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["micro"]


def test_completion_matches_the_generator(client, real_generator):
    result = client.completions.create(model="micro", prompt="def f(x):", max_tokens=12, temperature=0)
    expected = real_generator.generate("def f(x):", SamplingParams(max_new_tokens=12, temperature=0))[0]
    choice = result.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert result.usage.prompt_tokens == expected.prompt_tokens
    assert result.usage.completion_tokens == expected.completion_tokens
    assert result.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
    assert result.object == "text_completion"


def test_seeded_sampling_is_reproducible(client):
    def run(seed: int) -> str:
        return (
            client.completions.create(
                model="micro", prompt="import os", max_tokens=16, temperature=1.0, top_p=0.9, seed=seed
            )
            .choices[0]
            .text
        )

    assert run(3) == run(3)


def test_chat_uses_the_template_and_counts_tokens(client, real_generator):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    result = client.chat.completions.create(model="micro", messages=messages, max_tokens=10, temperature=0)
    tok = real_generator.tokenizer
    prompt_ids = tok.encode_prompt(tok.apply_chat_template(messages))
    assert prompt_ids[0] == tok.bos_id and result.usage.prompt_tokens == len(prompt_ids)
    expected = real_generator.generate_ids(
        [prompt_ids], SamplingParams(max_new_tokens=10, stop=chat_stop_strings(tok))
    )[0]
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == expected.text
    assert result.choices[0].finish_reason in ("stop", "length")
    assert result.usage.completion_tokens == expected.completion_tokens


def test_streaming_chat_equals_the_plain_reply(client):
    kwargs = dict(
        model="micro", messages=[{"role": "user", "content": "count"}], max_tokens=20, temperature=0
    )
    plain = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_streaming_completion_ends_with_done(server, client):
    stream = client.completions.create(
        model="micro", prompt="class A:", max_tokens=8, temperature=0, stream=True
    )
    pieces = list(stream)
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")
    # The raw stream ends with the [DONE] sentinel.
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"prompt": "class A:", "max_tokens": 4, "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"


def test_stop_string_ends_the_reply(client, real_generator):
    free = (
        client.completions.create(model="micro", prompt="def f(x):", max_tokens=30, temperature=0)
        .choices[0]
        .text
    )
    stop = free[5:8]  # a piece of what the model will say anyway
    assert stop
    result = client.completions.create(
        model="micro", prompt="def f(x):", max_tokens=30, temperature=0, stop=[stop]
    )
    assert result.choices[0].finish_reason == "stop"
    assert result.choices[0].text == free[: free.index(stop)]


def test_wrong_key_is_refused_by_the_client(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401


def test_context_overflow_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="micro", prompt="x", max_tokens=10_000)
    assert "context" in str(e.value)
    assert e.value.code == "context_length_exceeded"


def test_quantized_model_serves(micro_checkpoint):
    """``mobillama serve --bits 8`` path: the generation module's on-the-fly quantization behind the API."""
    from mobillama.serve.server import load_generator

    with live(lambda: load_generator(micro_checkpoint, dtype="bf16", bits=8), model_name="q") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        result = client.chat.completions.create(
            model="q", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
        )
    assert result.usage.completion_tokens >= 1
    assert result.choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_on_separate_slots_match_sequential_results(client, real_generator):
    """Two slots decode at once over the same weights, each with its own KV cache: no cross-talk."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["def a():", "import sys", "class B(object):", "for i in range(3):"]
    expected = [real_generator.generate(p, SamplingParams(max_new_tokens=24))[0].text for p in prompts]

    def ask(prompt: str) -> str:
        return (
            client.completions.create(model="micro", prompt=prompt, max_tokens=24, temperature=0)
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, prompts)) == expected
