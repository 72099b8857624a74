"""The ``mobillama serve`` command: bind policy, access log, and a graceful SIGTERM in a real process."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mobillama.cli import main
from mobillama.errors import MobiLlamaError
from mobillama.serve.server import check_bind

from .conftest import FakeGenerator, live

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_non_loopback_bind_needs_a_key(host, capsys, tmp_path):
    assert main(["serve", str(tmp_path), "--host", host]) == 2
    assert "refusing to listen on non-loopback address" in capsys.readouterr().err
    check_bind(host, "a-key", insecure=False)  # a key allows it
    check_bind(host, None, insecure=True)  # so does an explicit --insecure


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_binds_need_nothing(host):
    check_bind(host, None, insecure=False)


def test_unresolvable_host_is_a_clear_error():
    with pytest.raises(MobiLlamaError, match="cannot resolve"):
        check_bind("no-such-host.invalid", None, insecure=False)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--max-concurrency", "0"], "--max-concurrency must be >= 1"),
        (["--queue-size", "-1"], "--queue-size must be >= 0"),
        (["--max-body-bytes", "0"], "--max-body-bytes must be >= 1"),
        (["--port", "70000"], "--port must be in"),
    ],
)
def test_bad_options(args, message, capsys, tmp_path):
    assert main(["serve", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_checkpoint(capsys, tmp_path):
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.fixture
def restore_logging():
    """run_server configures the server loggers for a process; undo that for the next tests."""
    names = ("mobillama.serve", "mobillama.serve.access")
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in names}
    yield
    for n, (handlers, propagate) in saved.items():
        logging.getLogger(n).handlers[:] = handlers
        logging.getLogger(n).propagate = propagate


def test_model_that_fails_to_load_exits_with_a_clear_error(micro_checkpoint, capsys, restore_logging):
    # int4 needs a group size dividing every layer input; micro's FFN width 176 has none of 128/64/32.
    code = main(["serve", str(micro_checkpoint), "--port", str(_free_port()), "--bits", "4"])
    assert code == 2
    assert "error: cannot load the model: int4 groups of 32 do not divide" in capsys.readouterr().err


def _access_records(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "mobillama.serve.access"]


@pytest.mark.parametrize("log_prompts", [False, True])
def test_access_log_is_json_without_prompts_by_default(caplog, log_prompts):
    caplog.set_level(logging.INFO, logger="mobillama.serve.access")
    with live(FakeGenerator(), log_prompts=log_prompts) as s:
        body = {"messages": [{"role": "user", "content": "SECRET-PROMPT"}], "max_tokens": 4}
        assert httpx.post(s.url + "/v1/chat/completions", json=body).status_code == 200
        httpx.post(s.url + "/v1/completions", json={"prompt": "SECRET-2", "max_tokens": 2})
        httpx.post(s.url + "/v1/completions", content=b"{bad", headers={"Content-Type": "application/json"})
    records = _access_records(caplog)
    chat = next(r for r in records if r["path"] == "/v1/chat/completions")
    assert chat["method"] == "POST" and chat["status"] == 200
    assert chat["completion_tokens"] == 4 and chat["prompt_tokens"] > 0 and chat["latency_ms"] >= 0
    assert chat["finish_reason"] == "length"
    assert [r["status"] for r in records if r["path"] == "/v1/completions"] == [200, 400]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert ("SECRET-PROMPT" in logged) is log_prompts
    assert ("SECRET-2" in logged) is log_prompts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def long_context_checkpoint(tmp_path_factory) -> Path:
    """Context 4096: a reply of thousands of tokens is still running when SIGTERM arrives."""
    from mobillama.serve.demo import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve-long") / "micro", "micro", context=4096)


def test_sigterm_drains_then_cuts_streams_cleanly(long_context_checkpoint):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "MOBILLAMA_API_KEY": "k"}
    cmd = [
        sys.executable,
        "-m",
        "mobillama",
        "serve",
        str(long_context_checkpoint),
        "--port",
        str(port),
        "--shutdown-timeout",
        "0.5",
        "--dtype",
        "fp32",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.2)
        body = {
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 4000,
            "stream": True,
            "temperature": 1.0,
            "seed": 0,
        }
        lines = []
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"}, timeout=60
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line:
                    continue
                lines.append(line)
                # The stream is flowing: now stop the server (once: a second signal forces the exit).
                if len(lines) == 3:
                    proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2].removeprefix("data: "))
    assert final["choices"][0]["finish_reason"] in ("abort", "length", "stop")
    # Every chunk before is valid JSON: nothing was cut mid-event.
    for line in lines[:-1]:
        json.loads(line.removeprefix("data: "))
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    request = next(r for r in records if r["path"] == "/v1/chat/completions")
    assert request["status"] == 200 and request["finish_reason"] == final["choices"][0]["finish_reason"]
    assert "shutting down" in err
