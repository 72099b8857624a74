"""Fixtures for the server tests: a live uvicorn server on a free loopback port, a tiny real checkpoint,
and a scripted generator double for the HTTP-layer tests (queueing, cancellation, bad input)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from mobillama.infer.sampling import Completion, SamplingParams
from mobillama.serve.app import ServeSettings, create_app


class ByteTokenizer:
    """One token per UTF-8 byte (id = byte + 3)."""

    bos_id, eos_id, pad_id = 1, 2, 0
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return ([1] if add_bos else []) + [b + 3 for b in text.encode("utf-8")] + ([2] if add_eos else [])

    def decode(self, ids) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + "assistant:" if add_generation_prompt else text


class FakeGenerator:
    """The generator interface the server uses (``tokenizer``, ``context``, ``iter_ids``), scripted:
    emits ``"w0 w1 ..."`` one word per token, ``delay`` seconds apart, and records what happened.

    Only for the HTTP-layer tests; the end-to-end tests use the real Generator.
    """

    def __init__(self, context: int = 64, delay: float = 0.0) -> None:
        self.tokenizer = ByteTokenizer()
        self.context = context
        self.delay = delay
        self.lock = threading.Lock()
        self.started: list[list[int]] = []  # prompt ids, in the order generation started
        self.finished = 0
        self.closed_early = 0  # iterators closed before they finished (cancellation)
        self.tokens_emitted = 0
        self.gate: threading.Event | None = None  # when set up, each generation waits on it first

    def iter_ids(self, prompt_ids, params: SamplingParams):
        with self.lock:
            self.started.append(list(prompt_ids[0]))
        if self.gate is not None:
            self.gate.wait(10)
        done = False
        try:
            text = ""
            for i in range(params.max_new_tokens):
                if self.delay:
                    time.sleep(self.delay)
                delta = f"w{i} "
                text += delta
                with self.lock:
                    self.tokens_emitted += 1
                yield 0, delta
            done = True
            return [Completion(text, [], "length", len(prompt_ids[0]), params.max_new_tokens)]
        finally:
            with self.lock:
                if done:
                    self.finished += 1
                else:
                    self.closed_early += 1


class LiveServer:
    """A uvicorn server in a thread, on a free loopback port."""

    def __init__(self, app) -> None:
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        engine = self.app.state.engine
        while httpx.get(self.url + "/ready").status_code != 200:
            if engine.load_error is not None:
                raise RuntimeError(f"the model failed to load: {engine.load_error}")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready")
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@contextlib.contextmanager
def live(generator_or_loader, wait: bool = True, **settings):
    """Serve ``generator_or_loader`` with ``ServeSettings(**settings)``; yields the :class:`LiveServer`."""
    app = create_app(generator_or_loader, ServeSettings(**settings))
    with LiveServer(app) as server:
        if wait:
            server.wait_ready()
        yield server


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def fake() -> FakeGenerator:
    return FakeGenerator()


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory) -> Path:
    """A random-weight micro checkpoint (context 256) with a byte-level BPE tokenizer and chat template."""
    from mobillama.serve.demo import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "micro", "micro", context=256)


@pytest.fixture(scope="session")
def real_generator(micro_checkpoint):
    from mobillama.serve.server import load_generator

    return load_generator(micro_checkpoint, dtype="fp32")
