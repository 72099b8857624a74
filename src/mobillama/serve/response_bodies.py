"""OpenAI response bodies: a completion and a chat completion, whole or as stream chunks.

The routes decide what happens; these classes only say how it is written, so ``/v1/completions`` and
``/v1/chat/completions`` share one request flow and differ only in the shape object they pass it.
"""

from __future__ import annotations

import json
import time
import uuid


def sse_event(obj: dict) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": prompt_tokens + completion.completion_tokens,
    }


class TextShape:
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


class ChatShape(TextShape):
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


__all__ = ["ChatShape", "TextShape", "sse_event"]
