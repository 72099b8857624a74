"""Errors as OpenAI clients expect them: ``{"error": {"message", "type", "param", "code"}}`` with the
HTTP status. The gate, the body parser and the routes all raise or return :class:`APIError`, so every
failure the server reports has this one shape."""

from __future__ import annotations

from fastapi.responses import JSONResponse


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


__all__ = ["APIError"]
