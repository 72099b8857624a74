"""Queueing, 429 + Retry-After, fairness, readiness while loading, client disconnects, draining."""

from __future__ import annotations

import json
import socket
import threading

import httpx

from .conftest import FakeGenerator, live, wait_until

CHAT = "/v1/chat/completions"


def chat(url: str, content: str = "hi", max_tokens: int = 3, **more) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **more}
    return httpx.post(url + CHAT, json=body, timeout=30)


def test_full_queue_answers_429_with_retry_after():
    fake = FakeGenerator()
    fake.gate = threading.Event()  # generations block until released
    with live(fake, max_concurrency=1, queue_size=1) as s:
        results: dict[str, httpx.Response] = {}
        running = threading.Thread(target=lambda: results.__setitem__("running", chat(s.url, "a")))
        running.start()
        assert wait_until(lambda: len(fake.started) == 1)  # in the slot
        waiting = threading.Thread(target=lambda: results.__setitem__("waiting", chat(s.url, "b")))
        waiting.start()
        engine = s.app.state.engine
        assert wait_until(lambda: engine.waiting == 1)  # in the queue
        refused = chat(s.url, "c")
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        fake.gate.set()
        running.join(10)
        waiting.join(10)
        assert results["running"].status_code == 200 and results["waiting"].status_code == 200
        assert chat(s.url).status_code == 200  # room again


def test_queue_is_first_come_first_served():
    fake = FakeGenerator()
    fake.gate = threading.Event()
    with live(fake, max_concurrency=1, queue_size=8) as s:
        engine = s.app.state.engine
        threads = []
        for i in range(5):
            t = threading.Thread(target=chat, args=(s.url, f"m{i}"))
            t.start()
            threads.append(t)
            # Submit strictly one after another: job i is in before job i+1 is sent.
            assert wait_until(lambda i=i: engine.in_flight == i + 1)
        fake.gate.set()
        for t in threads:
            t.join(10)
    decoded = [fake.tokenizer.decode(ids) for ids in fake.started]
    assert [d.split("user: ")[1][:2] for d in decoded] == ["m0", "m1", "m2", "m3", "m4"]


def test_ready_only_after_the_model_loaded():
    release = threading.Event()
    fake = FakeGenerator()

    def slow_loader():
        release.wait(10)
        return fake

    with live(slow_loader, wait=False) as s:
        assert httpx.get(s.url + "/health").status_code == 200  # alive while loading
        not_ready = httpx.get(s.url + "/ready")
        assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "model_not_ready"
        early = chat(s.url)
        assert early.status_code == 503 and "retry-after" in early.headers
        release.set()
        s.wait_ready(10)
        assert chat(s.url).status_code == 200


def test_failed_load_is_reported_by_ready():
    def broken_loader():
        raise RuntimeError("weights are corrupt")

    with live(broken_loader, wait=False) as s:
        engine = s.app.state.engine
        assert wait_until(lambda: engine.load_error is not None)
        response = httpx.get(s.url + "/ready")
        assert response.status_code == 503
        assert "weights are corrupt" in response.json()["error"]["message"]


def _open_stream(port: int, body: dict) -> socket.socket:
    """A raw HTTP request whose connection the test can drop at will."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def test_disconnect_mid_stream_stops_generation():
    fake = FakeGenerator(delay=0.01)
    with live(fake, max_concurrency=1) as s:
        fake.context = 100_000
        body = {
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 20_000,
            "stream": True,
        }  # minutes
        sock = _open_stream(s.port, body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        assert wait_until(lambda: fake.tokens_emitted >= 5)
        sock.close()
        assert wait_until(lambda: fake.closed_early == 1), "generation went on after the client left"
        emitted = fake.tokens_emitted
        assert emitted < 20_000
        engine = s.app.state.engine
        assert wait_until(lambda: engine.in_flight == 0)
        # The slot is free again: a new request runs at once.
        assert chat(s.url, max_tokens=2).json()["choices"][0]["message"]["content"] == "w0 w1 "


def test_disconnect_while_waiting_in_the_queue_never_runs_the_job():
    fake = FakeGenerator()
    fake.gate = threading.Event()
    with live(fake, max_concurrency=1, queue_size=4) as s:
        engine = s.app.state.engine
        first = threading.Thread(target=chat, args=(s.url, "first"))
        first.start()
        assert wait_until(lambda: len(fake.started) == 1)
        sock = _open_stream(s.port, {"messages": [{"role": "user", "content": "gone"}], "max_tokens": 3})
        assert wait_until(lambda: engine.waiting == 1)
        sock.close()  # leaves while queued
        assert wait_until(lambda: any(job.cancel_reason == "disconnect" for job in list(engine._active)))
        fake.gate.set()
        first.join(10)
        assert wait_until(lambda: engine.in_flight == 0)
    assert len(fake.started) == 1  # the abandoned job never reached the model


def test_non_streaming_disconnect_also_cancels():
    fake = FakeGenerator(delay=0.01, context=100_000)
    with live(fake) as s:
        sock = _open_stream(s.port, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 20_000})
        assert wait_until(lambda: fake.tokens_emitted >= 5)
        sock.close()
        assert wait_until(lambda: fake.closed_early == 1)


def test_abort_ends_streams_with_a_final_event_and_done():
    """What SIGTERM does after the grace period: running streams end cleanly, marked 'abort'."""
    fake = FakeGenerator(delay=0.01, context=100_000)
    with live(fake) as s:
        engine = s.app.state.engine
        lines: list[str] = []

        def stream() -> None:
            body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 20_000, "stream": True}
            with httpx.stream("POST", s.url + CHAT, json=body, timeout=30) as r:
                lines.extend(line for line in r.iter_lines() if line)

        t = threading.Thread(target=stream)
        t.start()
        assert wait_until(lambda: fake.tokens_emitted >= 3)
        engine.begin_drain()
        assert chat(s.url).status_code == 503  # no new work while draining
        assert httpx.get(s.url + "/ready").status_code == 503
        assert engine.abort_all() == 1
        t.join(10)
    assert lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2].removeprefix("data: "))
    assert final["choices"][0]["finish_reason"] == "abort"
