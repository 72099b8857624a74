"""Request bodies to validated requests: bytes in, a :mod:`mobillama.serve.schemas` model out, or one
OpenAI-style 400 naming the problem.

The body is decoded as strict UTF-8, checked for nesting depth (:data:`MAX_JSON_DEPTH`, so the parser
cannot hit Python's recursion limit), parsed with NaN/Infinity and non-finite numbers refused (as in
standard JSON) and strings with an unpaired surrogate refused (not text), then validated by the pydantic
model, whose deepest error becomes the message and ``param``.
"""

from __future__ import annotations

import json
import math
import re
from array import array
from itertools import accumulate
from typing import Any

from pydantic import BaseModel, ValidationError

from mobillama.serve.api_errors import APIError


def parse_body(body: bytes, model: type[BaseModel]) -> Any:
    """The request body as ``model``, or an :class:`APIError` (400) naming the first problem."""
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


__all__ = ["MAX_JSON_DEPTH", "parse_body"]
