"""What every request passes before any route sees it: :class:`Gate`, a plain ASGI middleware.

It is ASGI rather than a FastAPI dependency so that it runs before any parsing and covers every route,
the unknown ones included. In order:

- one JSON access-log line per request (logger ``mobillama.serve.access``; prompts only with
  ``log_prompts``);
- the browser defences of :mod:`mobillama.serve.security`: a ``Host`` this server does not answer to is
  a 421 (DNS rebinding), a foreign ``Origin`` a 403, a body that is not ``application/json`` a 415, so no
  page can send a CORS "simple request" without a preflight (and no CORS header is ever sent, so
  preflights fail);
- the bearer-key check on ``/v1/*`` (``hmac.compare_digest``, constant time);
- the body size limit: ``Content-Length`` checked first, then the bytes actually received are counted.
  The body is read here and replayed to the app.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from mobillama.serve.api_errors import APIError
from mobillama.serve.security import HostPolicy, is_json, same_origin
from mobillama.serve.settings import ServeSettings

access_log = logging.getLogger("mobillama.serve.access")


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


__all__ = ["Gate"]
