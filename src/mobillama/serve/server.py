"""Running the app: the bind-address policy, logging, uvicorn, and a graceful SIGTERM.

Shutdown on SIGTERM/SIGINT: uvicorn stops accepting connections and waits for the open ones; at the
same moment the engine stops taking jobs (``/ready`` and new API calls answer 503), and the jobs already
submitted get ``shutdown_timeout`` seconds to finish. Whatever is still running then is cut at its next
token: a stream gets a last chunk with ``finish_reason: "abort"`` and ``data: [DONE]``, a plain request
its partial text with the same finish reason. The process then exits with status 0.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from mobillama.errors import MobiLlamaError
from mobillama.infer.generator import Generator
from mobillama.infer.load import describe_checkpoint, load_checkpoint_tokenizer, load_for_inference
from mobillama.serve.app import ServeSettings, create_app
from mobillama.serve.vision import VisionGenerator

log = logging.getLogger("mobillama.serve")


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        raise MobiLlamaError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to expose the model beyond this machine without a key, unless explicitly asked to."""
    if not is_loopback(host) and not api_key and not insecure:
        raise MobiLlamaError(
            f"refusing to listen on non-loopback address {host!r} without --api-key "
            "(or pass --insecure to serve without authentication)"
        )


def configure_logging() -> None:
    """Access log lines (already JSON) to stdout as they are; other server messages to stderr."""
    _log_to("mobillama.serve.access", sys.stdout, "%(message)s")
    _log_to("mobillama.serve", sys.stderr, "%(levelname)s %(name)s: %(message)s")


def _log_to(name: str, stream, fmt: str) -> None:
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(fmt))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the access log is not repeated by the server logger


def load_generator(checkpoint: str | Path, **load_options: Any):
    """The real model behind the server: the generation module's loader and tokenizer, or for a
    MobiLlama-V checkpoint (vision_config.json) a :class:`~mobillama.serve.vision.VisionGenerator`."""
    if describe_checkpoint(checkpoint, presets=False).is_vision:
        unsupported = sorted(k for k, v in load_options.items() if k != "dtype" and v is not None)
        if unsupported:
            raise MobiLlamaError(
                f"{', '.join('--' + k.replace('_', '-') for k in unsupported)}: not supported for a "
                "MobiLlama-V checkpoint"
            )
        return VisionGenerator.load(checkpoint, dtype=load_options.get("dtype") or "bf16")
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    return Generator(load_for_inference(checkpoint, **load_options), tokenizer)


def run_server(
    loader,
    settings: ServeSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    insecure: bool = False,
    shutdown_timeout: float = 30.0,
) -> None:
    """Serve until SIGTERM/SIGINT; raises :class:`MobiLlamaError` if the model fails to load."""
    import uvicorn

    check_bind(host, settings.api_key, insecure)
    if settings.host != host:  # the Host check must know the address actually bound
        settings = dataclasses.replace(settings, host=host)
    configure_logging()
    failure: list[BaseException] = []

    def on_load_failure(error: BaseException) -> None:
        failure.append(error)
        server.should_exit = True

    app = create_app(loader, settings, on_load_failure=on_load_failure)
    engine = app.state.engine
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        # A backstop only: streams end on their own within shutdown_timeout (engine.abort_all).
        timeout_graceful_shutdown=shutdown_timeout + 10,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:  # a second signal: stop waiting
                self.force_exit = True
                return
            self.should_exit = True
            engine.begin_drain()
            log.info(
                "shutting down: %d request(s) in flight, %.1fs to finish", engine.in_flight, shutdown_timeout
            )
            timer = threading.Timer(shutdown_timeout, engine.abort_all)
            timer.daemon = True
            timer.start()

    server = Server(config)
    scheme_host = f"[{host}]" if ":" in host else host
    log.info(
        "listening on http://%s:%d (model loading; GET /ready answers 200 once loaded)", scheme_host, port
    )
    server.run()
    if failure:
        raise MobiLlamaError(f"cannot load the model: {failure[0]}")
