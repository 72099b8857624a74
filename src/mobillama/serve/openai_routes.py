"""The OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

A request becomes a job on the :class:`~mobillama.serve.engine.Engine`'s queue; its events become one
JSON response or a server-sent event stream (:mod:`mobillama.serve.response_bodies`). A client that
disconnects has its job cancelled.

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
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mobillama.errors import MobiLlamaError
from mobillama.infer.sampling import SamplingParams, chat_stop_strings
from mobillama.serve.api_errors import APIError
from mobillama.serve.engine import Engine, Event, Job, NotReady, QueueFull
from mobillama.serve.request_body import parse_body
from mobillama.serve.response_bodies import ChatShape, TextShape, sse_event
from mobillama.serve.schemas import ChatCompletionRequest, CompletionRequest
from mobillama.serve.settings import ServeSettings
from mobillama.serve.vision import MAX_IMAGES_PER_REQUEST, read_image_url
from mobillama.tokenizer import encode_prompt
from mobillama.vision.config import IMAGE_PLACEHOLDER

POLL_S = 0.2  # how often a waiting request checks whether its client is still there


class _ClientGone(Exception):
    """The client disconnected; its job was cancelled and there is nobody to answer."""


class OpenAIRoutes:
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
                yield sse_event(chunk)
            while event.kind == "delta":
                if event.text:
                    yield sse_event(shape.delta(event.text))
                event = await self._next_event(request, job)
            if event.kind == "error":  # headers are sent: report in-band, then end the stream
                yield sse_event(
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
                yield sse_event(shape.final(event.completion))
                if include_usage:
                    yield sse_event(shape.usage_chunk(event.completion))
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
        req: CompletionRequest = parse_body(await request.body(), CompletionRequest)
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
        return await self._run(request, req, ids, params, TextShape(self.settings.model_name, len(ids)))

    async def chat_completions(self, request: Request) -> Response:
        req: ChatCompletionRequest = parse_body(await request.body(), ChatCompletionRequest)
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
        return await self._run(request, req, ids, params, ChatShape(self.settings.model_name, len(ids)))

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
        shape = ChatShape(self.settings.model_name, length)
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


__all__ = ["OpenAIRoutes"]
