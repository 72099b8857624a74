"""The OpenAI-compatible HTTP API and the chat page, as a FastAPI app built by :func:`create_app`.

Layers, outside in:

- :class:`Gate` (a plain ASGI middleware, so it runs before any parsing and covers every route): one JSON
  access-log line per request; the browser defences (a ``Host`` this server does not answer to is a 421,
  against DNS rebinding; a foreign ``Origin`` is a 403; a body that is not ``application/json`` is a 415,
  so no page can send a CORS "simple request" without a preflight, and no CORS header is ever sent, so
  preflights fail); the bearer-key check (``hmac.compare_digest``, constant time) on ``/v1/*``; and the
  body size limit (``Content-Length`` checked first, then the bytes actually received are counted).
- the routes: bodies are decoded (strict UTF-8), checked for nesting depth (:data:`MAX_JSON_DEPTH`,
  so the parser cannot hit Python's recursion limit) and parsed here (NaN/Infinity and non-finite numbers
  refused, as in standard JSON), then validated by the pydantic models
  of :mod:`mobillama.serve.schemas`, so every failure is one OpenAI-style error object
  ``{"error": {"message", "type", "param", "code"}}``.
- :class:`~mobillama.serve.engine.Engine`: worker threads that call the generation module.

``max_tokens`` policy: a prompt that leaves no room in the context, or an explicit ``max_tokens`` with
``prompt + max_tokens`` past the context, is a 400 (``context_length_exceeded``, like OpenAI); when
``max_tokens`` is omitted it defaults to ``default_max_tokens`` capped to the room left.

Images: when the engine's generator ``accepts_images`` (a MobiLlama-V checkpoint, see
:mod:`mobillama.serve.vision`), chat messages may hold ``image_url`` content parts; they are decoded here
(before queueing, so a bad image is a 400 that costs no slot) and travel with the job through the same
queue. Prompt lengths count each image's tokens. A text-only model answers an image part with a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import re
import time
import uuid
from array import array
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from itertools import accumulate
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mobillama.errors import MobiLlamaError
from mobillama.infer.sampling import SamplingParams, chat_stop_strings
from mobillama.serve.engine import Engine, Event, Job, NotReady, QueueFull
from mobillama.serve.schemas import ChatCompletionRequest, CompletionRequest
from mobillama.serve.security import HostPolicy, is_json, same_origin
from mobillama.serve.vision import MAX_IMAGE_BYTES, MAX_IMAGES_PER_REQUEST, read_image_url
from mobillama.tokenizer import encode_prompt
from mobillama.vision.model import IMAGE_PLACEHOLDER

access_log = logging.getLogger("mobillama.serve.access")
log = logging.getLogger("mobillama.serve")

POLL_S = 0.2  # how often a waiting request checks whether its client is still there


@dataclass
class ServeSettings:
    """Everything the app needs to know besides the model."""

    model_name: str = "mobillama"
    api_key: str | None = None
    max_concurrency: int = 1
    queue_size: int = 16
    max_body_bytes: int = 1_000_000
    log_prompts: bool = False
    default_max_tokens: int = 256
    retry_after_s: int = 1
    max_image_bytes: int = MAX_IMAGE_BYTES  # per image (decoded data URL or file); vision models only
    host: str = "127.0.0.1"  # the bound address: a Host header the server answers to
    allowed_hosts: tuple[str, ...] = ()  # more Host names to answer to ("*": any; see serve.security)
    image_dir: str | None = None  # local image paths are read only inside it (None: refused)


class APIError(Exception):
    """An HTTP error rendered as an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class _ClientGone(Exception):
    """The client disconnected; its job was cancelled and there is nobody to answer."""


# --------------------------------------------------------------------------------------------------
# The gate: access log, browser defences, API key, body size (before any parsing)
# --------------------------------------------------------------------------------------------------
class Gate:
    """Pure ASGI middleware: see the module docstring. The body is read here (bounded) and replayed."""

    def __init__(self, app, settings: ServeSettings) -> None:
        self.app = app
        self.settings = settings
        self.key = settings.api_key.encode() if settings.api_key else None
        self.hosts = HostPolicy(settings.host, tuple(settings.allowed_hosts))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        status = {"code": 0}

        async def logged_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = _headers(scope)
            with_body = scope["method"] in ("POST", "PUT", "PATCH")
            error = self._check_browser(scope, headers) or self._authorize(headers, scope["path"])
            if error is None and with_body:
                error = self._check_content_type(headers)
            body = b""
            if error is None and with_body:
                body, error = await self._read_body(headers, receive)
            if error is not None:
                await error.response()(scope, receive, logged_send)
                return
            await self.app(scope, _replay(body, receive), logged_send)
        except BaseException:
            status["code"] = status["code"] or 500
            raise
        finally:
            self._log(scope, state, status["code"], time.perf_counter() - start)

    def _check_browser(self, scope, headers: dict[str, str]) -> APIError | None:
        """421 for a Host this server does not answer to (DNS rebinding), 403 for a foreign Origin."""
        host = headers.get("host")
        if not self.hosts.allows(host, scope.get("server")):
            return APIError(
                421,
                f"this server does not answer to the host {_shown(host)} (a web page may be trying to reach "
                "it through DNS rebinding); start the server with --allowed-host NAME to accept that name",
                code="host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is not None and not same_origin(origin, host):
            return APIError(
                403,
                f"cross-origin request refused: origin {_shown(origin)} is not this server's own origin",
                code="origin_not_allowed",
            )
        return None

    @staticmethod
    def _check_content_type(headers: dict[str, str]) -> APIError | None:
        """415 unless the body is declared JSON: a cross-site page can send text/plain, form or multipart
        bodies without a CORS preflight, but not application/json."""
        content_type = headers.get("content-type")
        if is_json(content_type):
            return None
        return APIError(
            415,
            "the request body must be JSON: send the header 'Content-Type: application/json' (got "
            f"{_shown(content_type) if content_type is not None else 'none'})",
            code="unsupported_media_type",
        )

    def _authorize(self, headers: dict[str, str], path: str) -> APIError | None:
        if self.key is None or not path.startswith("/v1/"):
            return None
        header = headers.get("authorization", "").encode("latin-1")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return APIError(
                401,
                "missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(token.strip(), self.key):
            return APIError(
                401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
            )
        return None

    async def _read_body(self, headers: dict[str, str], receive) -> tuple[bytes, APIError | None]:
        limit = self.settings.max_body_bytes
        too_large = APIError(
            413, f"request body is larger than the limit of {limit} bytes", code="request_too_large"
        )
        declared = headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    return b"", too_large
            except ValueError:
                return b"", APIError(400, "invalid Content-Length header")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", APIError(400, "client disconnected while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _log(self, scope, state: dict, status: int, seconds: float) -> None:
        record: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "latency_ms": round(seconds * 1000, 1),
        }
        record.update(state.get("log", {}))
        if not self.settings.log_prompts:
            record.pop("prompt", None)
        access_log.info(json.dumps(record, ensure_ascii=False))


def _headers(scope) -> dict[str, str]:
    """The request's headers by lower-case name (latin-1, as HTTP carries them; the first of repeats)."""
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


def _shown(value: str | None, limit: int = 100) -> str:
    """A client-sent header value quoted for an error message, cut to ``limit`` characters."""
    value = value or ""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _replay(body: bytes, receive):
    """A receive() that hands the already-read body to the app once, then the client's own events
    (so ``http.disconnect`` still reaches the app)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


# --------------------------------------------------------------------------------------------------
# Requests to jobs
# --------------------------------------------------------------------------------------------------
def _parse(body: bytes, model: type[BaseModel]) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(
            400, f"request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding"
        ) from None
    if _too_deep(body):
        raise APIError(
            400,
            f"request body is nested more than {MAX_JSON_DEPTH} levels deep (arrays and objects)",
            code="json_too_deep",
        )
    try:
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise APIError(
            400,
            f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
            code="invalid_json",
        ) from None
    except _BadNumber as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    except ValueError:  # an integer past Python's digit limit for int()
        raise APIError(400, "request body has a number with too many digits", code="invalid_json") from None
    except RecursionError:  # a backstop: _too_deep should have refused it
        raise APIError(400, "request body is nested too deeply", code="json_too_deep") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(data):
        raise APIError(
            400,
            "request body has a string with an unpaired surrogate escape (such as \\ud800): not text",
            code="invalid_encoding",
        )
    if not isinstance(data, dict):
        raise APIError(
            400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json"
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        # The deepest error is the most specific: a content part's bad field rather than "content
        # should be a string" (the other member of the str | list union).
        first = max(e.errors(), key=lambda err: len(err["loc"]))
        parts = [str(p) for p in first["loc"] if _is_field(p)]
        # A tagged union's tag ("image_url") precedes the field of the same name: say it once.
        param = ".".join(p for i, p in enumerate(parts) if i == 0 or p != parts[i - 1]) or None
        extra = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
        message = first["msg"] if first["type"] != "extra_forbidden" else "unknown or unsupported parameter"
        raise APIError(400, f"{param}: {message}{extra}", param=param, code=first["type"]) from None


MAX_JSON_DEPTH = 64  # far more than any request needs; far less than the parser's recursion limit
# A JSON string in UTF-8 bytes (no multibyte character contains a '"' or '\\' byte).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether arrays/objects nest deeper than ``limit``, from the running count of brackets outside
    strings. Not recursive, so a body of thousands of ``[`` is a 400 rather than the parser's
    RecursionError; each step runs in C (the event loop is not held up by a body of a million
    brackets), and a body with fewer brackets than the limit is not scanned at all."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    steps = _JSON_STRING.sub(b"", body).translate(_STEPS, _NOT_BRACKETS)
    return max(accumulate(array("b", steps)), default=0) > limit


class _BadNumber(ValueError):
    """A number standard JSON does not have (NaN, Infinity) or that overflows a float (1e999999)."""


def _refuse_constant(name: str) -> float:
    raise _BadNumber(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber(f"the number {text[:20]}{'...' if len(text) > 20 else ''} is out of range")
    return value


def _has_lone_surrogate(data: Any) -> bool:
    """Whether a parsed body holds a string with an unpaired surrogate (a ``\\ud800`` escape): not text,
    and it would fail later when the string is encoded (tokenizer, log line)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_field(part: str | int) -> bool:
    """Whether a pydantic error-location part names a field or index (not a union member's type tag)."""
    return isinstance(part, int) or (part.isidentifier() and part not in _TYPE_TAGS)


class _API:
    """The route handlers, bound to one engine and one set of settings."""

    def __init__(self, engine: Engine, settings: ServeSettings) -> None:
        self.engine = engine
        self.settings = settings

    # ---- shared steps ------------------------------------------------------------------------------
    def _generator(self) -> Any:
        if self.engine.draining:
            raise APIError(
                503,
                "the server is shutting down",
                type="server_error",
                code="shutting_down",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        if not self.engine.ready.is_set():
            failed = self.engine.load_error is not None
            raise APIError(
                503,
                "the model failed to load" if failed else "the model is still loading",
                type="server_error",
                code="model_not_ready",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        return self.engine.generator

    def _params(self, req, n_prompt: int, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
        """Sampling parameters for a prompt of ``n_prompt`` positions (image tokens included)."""
        context = self.engine.generator.context
        room = context - n_prompt
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {n_prompt} tokens but the model's context is {context} "
                "tokens (leave room for at least one new token)",
                param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if max_tokens is None:
            max_tokens = min(self.settings.default_max_tokens, room)
        elif max_tokens > room:
            raise APIError(
                400,
                f"max_tokens is {max_tokens} but the prompt has {n_prompt} tokens and the "
                f"model's context is {context}: at most {room} new tokens fit",
                param="max_tokens",
                code="context_length_exceeded",
            )
        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                temperature=float(req.temperature if req.temperature is not None else 1.0),
                top_p=float(req.top_p if req.top_p is not None else 1.0),
                top_k=req.top_k or 0,
                repetition_penalty=float(req.repetition_penalty or 1.0),
                stop=tuple(dict.fromkeys([*(req.stop or []), *extra_stop])),
                seed=req.seed,
            )
        except MobiLlamaError as e:
            raise APIError(400, str(e)) from None

    def _submit(self, prompt_ids: list[int], params: SamplingParams, images: list | None = None) -> Job:
        try:
            return self.engine.submit(prompt_ids, params, images=images)
        except QueueFull as e:
            raise APIError(
                429,
                f"server busy: {e}; retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from None
        except NotReady as e:
            raise APIError(
                503,
                str(e),
                type="server_error",
                code="model_not_ready",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from None

    async def _next_event(self, request: Request, job: Job) -> Event:
        """The job's next event; cancels the job and raises :class:`_ClientGone` if the client left."""
        while True:
            # Checked by time, not only when idle: a fast stream of events must not hide a disconnect.
            now = time.monotonic()
            if now - job.polled_at >= POLL_S:
                job.polled_at = now
                if await request.is_disconnected():
                    job.cancel("disconnect")
                    raise _ClientGone()
            with contextlib.suppress(asyncio.TimeoutError):
                return await asyncio.wait_for(job.events.get(), POLL_S)

    @staticmethod
    def _raise_for(event: Event) -> None:
        if event.kind == "error":
            if isinstance(event.error, MobiLlamaError):
                raise APIError(400, str(event.error))
            raise APIError(500, "generation failed (see the server log)", type="server_error")

    async def _run(
        self,
        request: Request,
        req,
        prompt_ids: list[int],
        params: SamplingParams,
        shape,
        images: list | None = None,
    ) -> Response:
        state = request.state
        log_entry = {"prompt_tokens": shape.prompt_tokens, "stream": req.stream}
        if images:
            log_entry["images"] = len(images)
        state.log = {**getattr(state, "log", {}), **log_entry}
        job = self._submit(prompt_ids, params, images)
        try:
            first = await self._next_event(request, job)  # before any header: errors keep their status
        except _ClientGone:
            return Response(status_code=499)
        self._raise_for(first)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self._sse(request, job, first, shape, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        event = first
        try:
            while event.kind == "delta":
                event = await self._next_event(request, job)
        except _ClientGone:
            return Response(status_code=499)
        self._raise_for(event)
        completion = event.completion
        self._note(state, completion)
        return JSONResponse(shape.full(completion.text, completion))

    async def _sse(
        self, request: Request, job: Job, event: Event, shape, include_usage: bool
    ) -> AsyncIterator[str]:
        try:
            for chunk in shape.opening():
                yield _sse(chunk)
            while event.kind == "delta":
                if event.text:
                    yield _sse(shape.delta(event.text))
                event = await self._next_event(request, job)
            if event.kind == "error":  # headers are sent: report in-band, then end the stream
                yield _sse(
                    {
                        "error": {
                            "message": "generation failed (see the server log)",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    }
                )
            else:
                self._note(request.state, event.completion)
                yield _sse(shape.final(event.completion))
                if include_usage:
                    yield _sse(shape.usage_chunk(event.completion))
            yield "data: [DONE]\n\n"
        except _ClientGone:
            return
        finally:
            if not job.finished.is_set():
                job.cancel("disconnect")

    @staticmethod
    def _note(state, completion) -> None:
        state.log.update(
            completion_tokens=completion.completion_tokens, finish_reason=completion.finish_reason
        )

    # ---- routes --------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = _parse(await request.body(), CompletionRequest)
        generator = self._generator()
        if isinstance(req.prompt, str):
            request.state.log = {"prompt": req.prompt}
            ids = await asyncio.to_thread(encode_prompt, generator.tokenizer, req.prompt)
        else:
            ids = list(req.prompt)
            config = getattr(getattr(generator, "model", None), "config", None)
            vocab = getattr(config, "vocab_size", None) or getattr(generator.tokenizer, "vocab_size", None)
            bad = next((t for t in ids if t < 0 or (vocab is not None and t >= vocab)), None)
            if bad is not None:
                raise APIError(400, f"prompt token id {bad} is outside the vocabulary", param="prompt")
        params = self._params(req, len(ids))
        if getattr(generator, "accepts_images", False):
            self._check_vision_params(req)
        return await self._run(request, req, ids, params, _TextShape(self.settings.model_name, len(ids)))

    async def chat_completions(self, request: Request) -> Response:
        req: ChatCompletionRequest = _parse(await request.body(), ChatCompletionRequest)
        generator = self._generator()
        if req.messages[-1].role == "assistant":
            raise APIError(400, "the last message must not be from the assistant", param="messages")
        if getattr(generator, "accepts_images", False):
            return await self._chat_with_images(request, req, generator)
        for i, m in enumerate(req.messages):
            for j, _ in m.image_urls():
                raise APIError(
                    400,
                    "this model does not accept images (image_url content parts need a MobiLlama-V "
                    "checkpoint)",
                    param=f"messages.{i}.content.{j}",
                    code="images_not_supported",
                )
        messages = req.rendered_messages()
        tok = generator.tokenizer
        try:
            prompt = await asyncio.to_thread(tok.apply_chat_template, messages, add_generation_prompt=True)
        except Exception as e:  # a template may raise on a conversation it does not accept
            raise APIError(400, _template_error(e), param="messages") from None
        ids = await asyncio.to_thread(encode_prompt, tok, prompt)  # BOS by the tokenizer's rule, never twice
        params = self._params(req, len(ids), extra_stop=chat_stop_strings(tok))
        request.state.log = {"prompt": messages}
        return await self._run(request, req, ids, params, _ChatShape(self.settings.model_name, len(ids)))

    @staticmethod
    def _check_vision_params(req) -> None:
        if req.repetition_penalty not in (None, 1):
            raise APIError(
                400,
                "repetition_penalty is not supported by this (MobiLlama-V) model",
                param="repetition_penalty",
            )

    async def _chat_with_images(self, request: Request, req: ChatCompletionRequest, generator) -> Response:
        """A chat request to a MobiLlama-V model (with or without images): images decoded and checked
        here, the prompt rendered with one placeholder per image, then the engine's queue as usual."""
        self._check_vision_params(req)
        urls: list[tuple[str, str]] = []  # (param path, url)
        for i, m in enumerate(req.messages):
            if IMAGE_PLACEHOLDER in m.text():
                raise APIError(
                    400,
                    f"message {i} contains the text {IMAGE_PLACEHOLDER!r}; send images as image_url "
                    "content parts",
                    param=f"messages.{i}.content",
                )
            for j, url in m.image_urls():
                if m.role != "user":
                    raise APIError(
                        400, "images are accepted in user messages only", param=f"messages.{i}.content.{j}"
                    )
                urls.append((f"messages.{i}.content.{j}.image_url.url", url))
        if len(urls) > MAX_IMAGES_PER_REQUEST:
            raise APIError(
                400,
                f"{len(urls)} images in one request; at most {MAX_IMAGES_PER_REQUEST} are accepted",
                param="messages",
            )
        images = []
        for param, url in urls:
            try:
                image = await asyncio.to_thread(
                    read_image_url, url, self.settings.max_image_bytes, image_dir=self.settings.image_dir
                )
                images.append(image)
            except MobiLlamaError as e:
                raise APIError(400, f"{param}: {e}", param=param, code="invalid_image") from None
        messages = req.rendered_messages(image_placeholder=IMAGE_PLACEHOLDER)
        try:
            ids, length = await asyncio.to_thread(generator.chat_prompt, messages, len(images))
        except Exception as e:  # a template may raise on a conversation it does not accept
            raise APIError(400, _template_error(e), param="messages") from None
        params = self._params(req, length, extra_stop=chat_stop_strings(generator.hf))
        request.state.log = {"prompt": messages}
        shape = _ChatShape(self.settings.model_name, length)
        return await self._run(request, req, ids, params, shape, images=images)

    def accepts_images(self) -> bool | None:
        """Whether the loaded model takes image_url parts (None while it loads)."""
        if not self.engine.ready.is_set():
            return None
        return bool(getattr(self.engine.generator, "accepts_images", False))

    async def models(self, request: Request) -> Response:
        entry: dict[str, Any] = {
            "id": self.settings.model_name,
            "object": "model",
            "created": _STARTED,
            "owned_by": "mobillama",
        }
        if (images := self.accepts_images()) is not None:
            entry["accepts_images"] = images  # an extension: OpenAI's model object has no such field
        return JSONResponse({"object": "list", "data": [entry]})


_STARTED = int(time.time())


def _template_error(e: Exception) -> str:
    """One line for a chat template that failed on the messages (the tokenizer's own message if it has one)."""
    if isinstance(e, MobiLlamaError):
        return str(e)
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return f"the chat template rejected the messages: {detail}"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": prompt_tokens + completion.completion_tokens,
    }


class _TextShape:
    """Response bodies of ``/v1/completions``."""

    object = "text_completion"

    def __init__(self, model: str, prompt_tokens: int) -> None:
        self.id, self.model, self.prompt_tokens = f"cmpl-{uuid.uuid4().hex}", model, prompt_tokens
        self.created = int(time.time())

    def _base(self, choices: list, **more) -> dict:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
            **more,
        }

    def _choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def full(self, text: str, completion) -> dict:
        return self._base(
            [self._choice(text, completion.finish_reason)], usage=_usage(self.prompt_tokens, completion)
        )

    def opening(self) -> list[dict]:
        return []

    def delta(self, text: str) -> dict:
        return self._base([self._choice(text, None)])

    def final(self, completion) -> dict:
        return self._base([self._choice("", completion.finish_reason)])

    def usage_chunk(self, completion) -> dict:
        return self._base([], usage=_usage(self.prompt_tokens, completion))


class _ChatShape(_TextShape):
    """Response bodies of ``/v1/chat/completions``."""

    object = "chat.completion"

    def __init__(self, model: str, prompt_tokens: int) -> None:
        super().__init__(model, prompt_tokens)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"

    def _chunk(self, delta: dict, finish_reason: str | None) -> dict:
        body = self._base([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])
        return body | {"object": "chat.completion.chunk"}

    def full(self, text: str, completion) -> dict:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": completion.finish_reason,
        }
        return self._base([choice], usage=_usage(self.prompt_tokens, completion))

    def opening(self) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""}, None)]

    def delta(self, text: str) -> dict:
        return self._chunk({"content": text}, None)

    def final(self, completion) -> dict:
        return self._chunk({}, completion.finish_reason)

    def usage_chunk(self, completion) -> dict:
        return self._base([], usage=_usage(self.prompt_tokens, completion)) | {
            "object": "chat.completion.chunk"
        }


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------
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
    api = _API(engine, settings)

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


__all__ = ["APIError", "Gate", "ServeSettings", "create_app"]
