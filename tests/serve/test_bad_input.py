"""Bad input: every malformed request gets the matching 4xx with an OpenAI-style error object, and the
server stays healthy (and keeps answering good requests) afterwards."""

from __future__ import annotations

import json

import httpx
import pytest

from .conftest import FakeGenerator, live

KEY = "sk-bad-input"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def server():
    with live(FakeGenerator(context=64), api_key=KEY, max_body_bytes=1_000_000) as s:
        yield s


def post(server, path: str, body=None, *, raw: bytes | None = None, headers=None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(
        server.url + path,
        content=content,
        headers={"Content-Type": "application/json", **AUTH, **(headers or {})},
    )


def assert_error(
    response: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


CASES = [
    # (id, path, body or raw bytes, status, param)
    ("malformed-json", CHAT, b'{"messages": [', 400, None),
    ("json-not-object", CHAT, b"[1, 2]", 400, None),
    ("empty-body", CHAT, b"", 400, None),
    ("missing-messages", CHAT, {"max_tokens": 3}, 400, "messages"),
    ("missing-prompt", COMP, {"max_tokens": 3}, 400, "prompt"),
    ("messages-wrong-type", CHAT, {"messages": "hi"}, 400, "messages"),
    ("empty-messages", CHAT, {"messages": []}, 400, "messages"),
    ("unknown-role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("content-wrong-type", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, None),
    ("message-missing-content", CHAT, {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("max-tokens-negative", CHAT, {**OK_CHAT, "max_tokens": -1}, 400, "max_tokens"),
    ("max-tokens-zero", CHAT, {**OK_CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-string", CHAT, {**OK_CHAT, "max_tokens": "5"}, 400, "max_tokens"),
    ("max-tokens-float", CHAT, {**OK_CHAT, "max_tokens": 2.5}, 400, "max_tokens"),
    ("max-tokens-huge", CHAT, {**OK_CHAT, "max_tokens": 10**12}, 400, "max_tokens"),
    ("temperature-negative", CHAT, {**OK_CHAT, "temperature": -0.5}, 400, "temperature"),
    ("temperature-string", CHAT, {**OK_CHAT, "temperature": "hot"}, 400, "temperature"),
    ("top-p-zero", CHAT, {**OK_CHAT, "top_p": 0}, 400, "top_p"),
    ("n-two", CHAT, {**OK_CHAT, "n": 2}, 400, "n"),
    ("seed-string", CHAT, {**OK_CHAT, "seed": "x"}, 400, "seed"),
    ("stream-string", CHAT, {**OK_CHAT, "stream": "yes"}, 400, "stream"),
    ("too-many-stops", CHAT, {**OK_CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("empty-stop", CHAT, {**OK_CHAT, "stop": [""]}, 400, "stop"),
    ("unknown-field", CHAT, {**OK_CHAT, "temprature": 1}, 400, "temprature"),
    ("unsupported-penalty", CHAT, {**OK_CHAT, "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("last-message-assistant", CHAT, {"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ("prompt-past-context", COMP, {"prompt": "x" * 500}, 400, "prompt"),
    ("chat-past-context", CHAT, {"messages": [{"role": "user", "content": "y" * 5000}]}, 400, "messages"),
    ("prompt-plus-max-tokens", COMP, {"prompt": "abc", "max_tokens": 62}, 400, "max_tokens"),
    ("empty-prompt", COMP, {"prompt": ""}, 400, "prompt"),
    ("two-prompts", COMP, {"prompt": ["a", "b"]}, 400, "prompt"),
    ("token-id-out-of-vocab", COMP, {"prompt": [5, 10**9]}, 400, "prompt"),
    ("invalid-utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
    # bodies the JSON parser cannot take (more in test_security.py): 400, never a 500
    ("deep-arrays", CHAT, b"[" * 5000, 400, None),
    ("deep-objects", COMP, b'{"a":' * 100_000, 400, None),
    ("float-overflow", CHAT, b'{"messages": [], "temperature": 1e999999}', 400, None),
    ("nan", CHAT, b'{"messages": [], "temperature": NaN}', 400, None),
    ("lone-surrogate", CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, None),
    ("seed-past-range", CHAT, {**OK_CHAT, "seed": 2**64}, 400, "seed"),
]


@pytest.mark.parametrize("path,body,status,param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request(server, path, body, status, param):
    response = post(server, path, raw=body) if isinstance(body, bytes) else post(server, path, body)
    assert_error(response, status, param)


def test_context_errors_say_why(server):
    error = assert_error(
        post(server, COMP, {"prompt": "abc", "max_tokens": 62}), 400, code="context_length_exceeded"
    )
    assert "at most 60 new tokens fit" in error["message"]  # 4 prompt tokens (BOS + 3) in a 64-token context


def test_omitted_max_tokens_is_capped_to_the_context(server):
    response = post(server, COMP, {"prompt": "x" * 50})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 64 - 51


def test_ten_megabyte_body_is_refused_before_parsing(server):
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * 10_000_000 + b'"}]}'
    assert_error(post(server, CHAT, raw=body), 413, code="request_too_large")


def test_body_limit_without_content_length(server):
    def chunks():  # chunked transfer encoding: no Content-Length to trust
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"a" * 100_000
        yield b'"}]}'

    response = httpx.post(
        server.url + CHAT, content=chunks(), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert_error(response, 413, code="request_too_large")


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer"}],
    ids=["missing", "wrong", "wrong-scheme", "empty"],
)
def test_api_key_required(server, headers):
    for path, method in [(CHAT, "POST"), ("/v1/models", "GET")]:
        response = httpx.request(method, server.url + path, json=OK_CHAT, headers=headers)
        assert_error(response, 401, code="invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"


def test_health_page_and_ready_need_no_key(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").status_code == 200
    assert "<title>mobillama chat</title>" in httpx.get(server.url + "/").text


def test_unknown_route_and_method(server):
    assert_error(httpx.get(server.url + "/v1/nothing", headers=AUTH), 404)
    assert_error(httpx.get(server.url + CHAT, headers=AUTH), 405)


def test_still_healthy_after_all_that(server):
    for case in CASES:  # the whole suite again, back to back
        path, body = case[1], case[2]
        post(server, path, raw=body) if isinstance(body, bytes) else post(server, path, body)
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ready").status_code == 200
    response = post(server, CHAT, OK_CHAT)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "w0 w1 w2 "
