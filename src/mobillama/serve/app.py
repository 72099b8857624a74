"""The OpenAI-compatible HTTP API and the chat page, as a FastAPI app built by :func:`create_app`.

This module only assembles the server. Layers, outside in:

- :class:`~mobillama.serve.gate.Gate` (a plain ASGI middleware, so it runs before any parsing and
  covers every route): the access log, the browser defences of :mod:`mobillama.serve.security`, the API
  key and the body size limit.
- the routes: :mod:`mobillama.serve.openai_routes` (``/v1/*``; bodies parsed by
  :mod:`mobillama.serve.request_body` into the models of :mod:`mobillama.serve.schemas`, answers shaped
  by :mod:`mobillama.serve.response_bodies`), and here ``/health``, ``/ready`` and the chat page ``/``.
  Every failure is one OpenAI-style error object ``{"error": {"message", "type", "param", "code"}}``
  (:class:`~mobillama.serve.api_errors.APIError`), unknown routes and unhandled errors included.
- :class:`~mobillama.serve.engine.Engine`: worker threads that call the generation module.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mobillama.serve.api_errors import APIError
from mobillama.serve.engine import Engine
from mobillama.serve.gate import Gate
from mobillama.serve.openai_routes import OpenAIRoutes
from mobillama.serve.security import HostPolicy
from mobillama.serve.settings import ServeSettings

log = logging.getLogger("mobillama.serve")


def _is_generator(obj: Any) -> bool:
    return hasattr(obj, "iter_ids") and hasattr(obj, "tokenizer")


def create_app(
    generator_or_loader: Any | Callable[[], Any],
    settings: ServeSettings | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """Build the server app around a generator (a :class:`~mobillama.infer.generator.Generator` or anything
    with its ``tokenizer``/``context``/``iter_ids``), or a zero-argument loader returning one; a loader
    runs in a background thread at startup so ``/health`` answers while the model loads.

    The engine is ``app.state.engine`` (the CLI uses it to drain on SIGTERM).
    """
    settings = settings or ServeSettings()
    HostPolicy(settings.host, tuple(settings.allowed_hosts))  # a bad allowed host fails here, not per request
    loader = (lambda: generator_or_loader) if _is_generator(generator_or_loader) else generator_or_loader
    engine = Engine(loader, max_concurrency=settings.max_concurrency, queue_size=settings.queue_size)
    api = OpenAIRoutes(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start_loading(on_load_failure)
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="mobillama", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.settings = settings

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found" if exc.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, code=kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return APIError(500, "internal server error (see the server log)", type="server_error").response()

    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        if engine.ready.is_set() and not engine.draining:
            return JSONResponse(
                {
                    "status": "ready",
                    "model": settings.model_name,
                    "in_flight": engine.in_flight,
                    "accepts_images": api.accepts_images(),
                }
            )
        if engine.draining:
            message, code = "the server is shutting down", "shutting_down"
        elif engine.load_error is not None:
            message, code = f"the model failed to load: {engine.load_error}", "model_load_failed"
        else:
            message, code = "the model is still loading", "model_not_ready"
        return APIError(
            503, message, type="server_error", code=code, headers={"Retry-After": str(settings.retry_after_s)}
        ).response()

    page = resources.files("mobillama.serve").joinpath("static/index.html")

    @app.get("/")
    async def index() -> Response:
        return HTMLResponse(page.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})

    app.add_middleware(Gate, settings=settings)
    return app


__all__ = ["ServeSettings", "create_app"]
