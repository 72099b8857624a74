"""Requests a web page can make the user's browser send to the local server are refused before anything
runs: a cross-site "simple request" (text/plain, form or multipart body: 415; a foreign Origin: 403), a
DNS-rebinding page (its own name in Host: 421), and no CORS header is ever sent. Bodies the JSON parser
cannot take (deep nesting, NaN, huge numbers, lone surrogates) are 400s, never 500s. Local image paths
for MobiLlama-V: tests/serve/test_vision.py (they need a vision checkpoint); the chat page still works
in a real browser: tests/serve/test_browser.py."""

from __future__ import annotations

import json

import httpx
import pytest

from mobillama.errors import MobiLlamaError
from mobillama.serve.request_body import MAX_JSON_DEPTH
from mobillama.serve.security import HostPolicy, is_json, same_origin, split_host

from .conftest import FakeGenerator, live
from .test_bad_input import assert_error

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
OK_CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode()
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def fake() -> FakeGenerator:
    return FakeGenerator(context=64)


@pytest.fixture(scope="module")
def server(fake):
    with live(fake) as s:
        yield s


def post(server, body: bytes = OK_CHAT, path: str = CHAT, **headers: str) -> httpx.Response:
    return httpx.post(server.url + path, content=body, headers=headers)


def assert_no_cors(response: httpx.Response) -> None:
    assert not [h for h in response.headers if h.lower().startswith("access-control-")], response.headers


# ---- cross-site simple requests ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain;charset=UTF-8",  # what fetch() sends for a string body without headers
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonp",
        "application/json-seq",
        "",
        None,
    ],
)
@pytest.mark.parametrize("path", [CHAT, COMP])
def test_a_body_that_is_not_json_is_415_and_runs_nothing(server, fake, content_type, path):
    started = len(fake.started)
    body = OK_CHAT if path == CHAT else b'{"prompt": "hi", "max_tokens": 3}'
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = post(server, body, path, **headers)
    error = assert_error(response, 415, code="unsupported_media_type")
    assert "Content-Type: application/json" in error["message"]
    assert_no_cors(response)
    assert len(fake.started) == started  # no generation ran


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "Application/JSON",
        "application/json; charset=utf-8",
        "application/json ;charset=utf-8",
    ],
)
def test_json_content_types_are_accepted(server, content_type):
    response = post(server, **{"Content-Type": content_type})
    assert response.status_code == 200, response.text


def test_the_openai_client_headers_pass(server):
    # What the official client sends (see test_openai_client.py for the client itself).
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": "OpenAI/Python",
    }
    assert post(server, **headers).status_code == 200


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "https://evil.example",
        "null",
        "http://127.0.0.1",
        "http://127.0.0.1:1",
        "file://",
    ],
)
def test_a_foreign_origin_is_403_on_every_route(server, fake, origin):
    started = len(fake.started)
    for method, path in [
        ("POST", CHAT),
        ("POST", COMP),
        ("GET", "/v1/models"),
        ("GET", "/"),
        ("GET", "/ready"),
    ]:
        response = httpx.request(
            method, server.url + path, content=OK_CHAT, headers={**JSON, "Origin": origin}
        )
        error = assert_error(response, 403, code="origin_not_allowed")
        assert "cross-origin request refused" in error["message"]
        assert_no_cors(response)
    assert len(fake.started) == started


def test_a_cross_site_simple_request_is_refused_whatever_it_tries(server, fake):
    started = len(fake.started)
    for headers in (
        {"Origin": "http://evil.example", "Content-Type": "text/plain"},
        {"Origin": "http://evil.example", "Content-Type": "application/json"},  # would need a preflight
        {"Content-Type": "text/plain"},  # no Origin (an old browser, a form with Referrer-Policy)
    ):
        assert post(server, **headers).status_code in (403, 415)
    assert len(fake.started) == started


def test_the_servers_own_origin_is_accepted(server):
    port = server.port
    for host, origin in [
        (f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"),
        (f"localhost:{port}", f"http://localhost:{port}"),
        (f"[::1]:{port}", f"http://[::1]:{port}"),
    ]:
        response = post(server, **JSON, Host=host, Origin=origin)
        assert response.status_code == 200, (host, response.text)
        assert_no_cors(response)


def test_a_cors_preflight_gets_no_permission(server):
    for origin in ("http://evil.example", server.url):
        response = httpx.options(
            server.url + CHAT,
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert response.status_code >= 400
        assert_no_cors(response)


def test_no_response_carries_cors_headers(server):
    responses = [
        post(server, **JSON),
        post(server, **JSON, Origin=server.url),
        post(server, b"[", **JSON),
        post(server, **{"Content-Type": "text/plain"}),
        post(server, **JSON, Host="evil.example"),
        httpx.get(server.url + "/"),
        httpx.get(server.url + "/health"),
        httpx.get(server.url + "/ready"),
        httpx.get(server.url + "/v1/models", headers={"Origin": server.url}),
        httpx.get(server.url + "/v1/nothing"),
    ]
    for response in responses:
        assert_no_cors(response)
    stream = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + CHAT, json=stream, headers={"Origin": server.url}) as r:
        assert r.status_code == 200
        assert_no_cors(r)


# ---- DNS rebinding: the Host header -----------------------------------------------------------------
@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:{port}",
        "127.0.0.1.evil.example:{port}",
        "localhost.evil.example",
        "localhost:{other}",
        "127.0.0.1:{other}",
        "127.0.0.2:{port}",
        "0.0.0.0:{port}",
        "[::1",
        "localhost:port",
        "user@127.0.0.1",
        "",
    ],
)
def test_a_host_the_server_does_not_answer_to_is_421_on_every_route(server, fake, host):
    host = host.format(port=server.port, other=server.port + 1 if server.port < 65535 else 1)
    started = len(fake.started)
    for method, path in [("POST", CHAT), ("GET", "/v1/models"), ("GET", "/"), ("GET", "/health")]:
        response = httpx.request(method, server.url + path, content=OK_CHAT, headers={**JSON, "Host": host})
        error = assert_error(response, 421, code="host_not_allowed")
        assert "--allowed-host" in error["message"] and "\n" not in error["message"]
        assert_no_cors(response)
    assert len(fake.started) == started


@pytest.mark.parametrize(
    "host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "localhost", "LOCALHOST"]
)
def test_loopback_names_are_answered(server, host):
    response = post(server, **JSON, Host=host.format(port=server.port))
    assert response.status_code == 200, response.text


def test_allowed_host_lets_a_name_in():
    with live(FakeGenerator(), allowed_hosts=("mybox.lan", "proxy.example:443")) as s:
        for host in ("mybox.lan", f"mybox.lan:{s.port}", "MyBox.lan:9999", "proxy.example:443"):
            response = post(s, **JSON, Host=host)
            assert response.status_code == 200, (host, response.text)
        for host in ("proxy.example", "proxy.example:80", "evil.example", "sub.mybox.lan"):
            assert_error(post(s, **JSON, Host=host), 421, code="host_not_allowed")
        # the page served under that name works from its own origin
        assert post(s, **JSON, Host="mybox.lan", Origin="http://mybox.lan").status_code == 200
        assert_error(post(s, **JSON, Host="mybox.lan", Origin="http://evil.example"), 403)


def test_allowed_host_star_answers_any_host():
    with live(FakeGenerator(), allowed_hosts=("*",)) as s:
        assert post(s, **JSON, Host="anything.example").status_code == 200
        # Origin and Content-Type are still checked
        assert_error(post(s, **JSON, Host="a.example", Origin="http://b.example"), 403)
        assert_error(post(s, **{"Content-Type": "text/plain"}), 415)


def test_host_is_checked_before_the_api_key():
    with live(FakeGenerator(), api_key="k") as s:
        assert_error(post(s, **JSON, Host="evil.example"), 421)
        assert_error(post(s, **JSON), 401)
        assert post(s, **JSON, Authorization="Bearer k").status_code == 200


def test_a_bad_allowed_host_setting_fails_at_startup():
    with pytest.raises(MobiLlamaError, match="allowed host 'http://x' is not a host name"):
        HostPolicy("127.0.0.1", ("http://x",))


def test_host_policy_for_the_wildcard_address():
    policy = HostPolicy("0.0.0.0")
    lan = ("192.168.1.5", 8000)
    assert policy.allows("192.168.1.5:8000", lan)  # the address the connection arrived on
    assert policy.allows("192.168.1.5", lan)
    assert policy.allows("localhost:8000", ("127.0.0.1", 8000))
    assert not policy.allows("192.168.1.5:8001", lan)
    assert not policy.allows("192.168.1.6:8000", lan)
    assert not policy.allows("mybox.lan:8000", lan)  # a name: only with --allowed-host
    assert not policy.allows("0.0.0.0:8000", lan)
    assert HostPolicy("0.0.0.0", ("mybox.lan",)).allows("mybox.lan:8000", lan)
    assert HostPolicy("::", ("*",)).allows("anything:1", lan)
    assert HostPolicy("::").allows("192.168.1.5:8000", ("::ffff:192.168.1.5", 8000))  # dual-stack socket
    assert HostPolicy("::").allows("[fe80::1]:8000", ("fe80::1", 8000))
    assert HostPolicy("mybox.lan").allows("mybox.lan:8000", lan)  # a named bind address
    assert policy.allows(None, lan)  # no Host header at all: not a browser (HTTP/1.0 tools)


def test_header_helpers():
    assert split_host("LocalHost:8000") == ("localhost", 8000)
    assert split_host("[::1]:8000") == ("::1", 8000)
    assert split_host("[::ffff:127.0.0.1]") == ("127.0.0.1", None)
    assert split_host("::1") == ("::1", None)
    for bad in ("", ":80", "a:b", "a:99999", "[::1]x", "a/b", "a b", "a@b"):
        assert split_host(bad) is None, bad
    assert same_origin("http://localhost:8000", "localhost:8000")
    assert same_origin("http://localhost", "localhost:80")
    assert not same_origin("http://localhost:8000", "localhost:8001")
    assert not same_origin("null", "localhost:8000")
    assert not same_origin("http://localhost:8000", None)
    assert not same_origin("http://[bad:8000", "localhost:8000")
    assert is_json("application/json; charset=utf-8") and not is_json("text/plain") and not is_json(None)


# ---- bodies the JSON parser cannot take ---------------------------------------------------------------
DEEP = [
    ("5000-arrays", b"[" * 5000),
    ("5000-arrays-closed", b"[" * 5000 + b"]" * 5000),
    ("100k-objects", b'{"a":' * 100_000),
    ("100k-objects-closed", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
    ("in-a-field", b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": ' + b"[" * 5000),
    ("mixed", b'{"a":[' * 3000),
    ("just-past-the-limit", b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)),
]


@pytest.mark.parametrize("body", [b for _, b in DEEP], ids=[name for name, _ in DEEP])
@pytest.mark.parametrize("path", [CHAT, COMP])
def test_deep_nesting_is_a_400(server, path, body):
    error = assert_error(post(server, body, path, **JSON), 400, code="json_too_deep")
    assert f"nested more than {MAX_JSON_DEPTH} levels" in error["message"]


def test_nesting_at_the_limit_and_brackets_in_strings_are_parsed(server):
    at_limit = b'{"logit_bias": {"a": ' + b"[" * (MAX_JSON_DEPTH - 2) + b"]" * (MAX_JSON_DEPTH - 2) + b"}}"
    error = assert_error(post(server, at_limit, **JSON), 400)  # parsed, then refused by the schema
    assert error["code"] != "json_too_deep" and error["param"] in ("messages", "logit_bias"), error
    text = "[{" * 5000 + '\\"[' * 100
    body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 2}).encode()
    assert len(body) < 1_000_000
    response = post(server, body, **JSON)
    assert response.status_code in (200, 400), response.text  # parsed (the prompt may be past the context)
    assert response.json().get("error", {}).get("code") != "json_too_deep"


ODD = [
    (
        "huge-float",
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999999}',
        "invalid_json",
    ),
    ("huge-negative-float", b'{"messages": [], "temperature": -1e999999}', "invalid_json"),
    ("nan", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "invalid_json"),
    ("infinity", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', "invalid_json"),
    (
        "minus-infinity",
        b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}',
        "invalid_json",
    ),
    ("huge-int", b'{"messages": [], "max_tokens": ' + b"9" * 10_000 + b"}", "invalid_json"),
    ("big-seed", b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 30 + b"}", None),
    ("lone-surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "invalid_encoding"),
    ("lone-low-surrogate", b'{"prompt": "a\\udc00b"}', "invalid_encoding"),
    ("surrogate-key", b'{"\\ud800": 1}', "invalid_encoding"),
    ("top-level-array", b'[{"messages": []}]', "invalid_json"),
    ("top-level-string", b'"\\ud800"', "invalid_encoding"),
    ("top-level-number", b"1e999999", "invalid_json"),
    ("null", b"null", "invalid_json"),
]


@pytest.mark.parametrize("body,code", [c[1:] for c in ODD], ids=[c[0] for c in ODD])
def test_odd_json_is_a_400(server, body, code):
    path = COMP if b"prompt" in body else CHAT
    error = assert_error(post(server, body, path, **JSON), 400, code=code)
    assert "\n" not in error["message"]


def test_duplicate_keys_and_paired_surrogates_are_fine(server):
    dup = b'{"max_tokens": 1, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}'
    response = post(server, dup, **JSON)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2  # the last wins
    emoji = b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 1}'
    assert post(server, emoji, **JSON).status_code == 200


def test_still_healthy_after_all_that(server):
    for _, body in DEEP:
        post(server, body, **JSON)
    for _, body, _ in ODD:
        post(server, body, **JSON)
    assert httpx.get(server.url + "/ready").status_code == 200
    assert post(server, **JSON).json()["choices"][0]["message"]["content"] == "w0 w1 w2 "


# ---- the command line -----------------------------------------------------------------------------------
def _settings(monkeypatch, argv) -> object:
    from mobillama.cli import main

    seen = {}
    monkeypatch.setattr(
        "mobillama.serve.server.run_server", lambda loader, settings, **kw: seen.update(settings=settings)
    )
    assert main(argv) == 0
    return seen["settings"]


def test_cli_options_reach_the_settings(monkeypatch, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "link").symlink_to(images)
    settings = _settings(
        monkeypatch,
        [
            "serve",
            str(tmp_path),
            "--allowed-host",
            "mybox.lan",
            "--allowed-host",
            "[::1]:9",
            "--image-dir",
            str(tmp_path / "link"),
        ],
    )
    assert settings.allowed_hosts == ("mybox.lan", "[::1]:9")
    assert settings.image_dir == str(images.resolve())  # the real path
    assert settings.host == "127.0.0.1"
    settings = _settings(monkeypatch, ["serve", str(tmp_path)])
    assert settings.allowed_hosts == () and settings.image_dir is None


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--image-dir", "{tmp}/missing"], "--image-dir: not a directory"),
        (["--allowed-host", "http://x"], "--allowed-host 'http://x' is not a host name"),
        (["--allowed-host", ""], "--allowed-host '' is not a host name"),
    ],
)
def test_cli_refuses_bad_options(monkeypatch, capsys, tmp_path, argv, message):
    from mobillama.cli import main

    monkeypatch.setattr("mobillama.serve.server.run_server", lambda *a, **kw: pytest.fail("started"))
    assert main(["serve", str(tmp_path), *[a.format(tmp=tmp_path) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and len(err.strip().splitlines()) == 1


def test_help_says_what_star_does(capsys):
    from mobillama.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--allowed-host HOST" in text and "'*' accepts any Host" in text
    assert "--image-dir DIR" in text and "0.0.0.0" in text
