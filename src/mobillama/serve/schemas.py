"""OpenAI request bodies as pydantic models: precise types and ranges, unknown fields refused.

Only what the server implements is accepted. Fields OpenAI defines but this server does not implement
(``n > 1``, penalties, logprobs, tools, ...) are declared so that their neutral value passes and any
other value is a clear 400 naming the field, rather than being silently ignored. ``top_k`` and
``repetition_penalty`` are extensions (as in vLLM) passed straight to the sampler.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

Number = StrictFloat | StrictInt
MAX_STOP_STRINGS = 4  # as OpenAI


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0)] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)] | None = None  # torch's seed range
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: StrictStr | None = None
    # Declared to refuse non-neutral values clearly (not implemented).
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    logit_bias: dict[str, Any] | None = None
    logprobs: Literal[False] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict | None) -> dict | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value


class CompletionRequest(_Request):
    """``POST /v1/completions``: one prompt (a string, a one-string list, or token ids)."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt]
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list) -> str | list[int]:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be empty")
            if isinstance(value[0], str):
                if len(value) != 1:
                    raise ValueError("one prompt per request (send several requests)")
                value = value[0]
        if isinstance(value, str) and not value:
            raise ValueError("prompt must not be empty")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: StrictStr


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: StrictStr
    detail: Literal["auto", "low", "high"] | None = None  # accepted; every image is resized the same way


class ImagePart(BaseModel):
    """An image (MobiLlama-V checkpoints only): a base64 data URL, or a local file path when the server
    has an image directory (see :func:`mobillama.serve.vision.read_image_url`)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart]
    name: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def image_urls(self) -> list[tuple[int, str]]:
        """(part index, url) of each image part, in order."""
        if isinstance(self.content, str):
            return []
        return [(j, p.image_url.url) for j, p in enumerate(self.content) if isinstance(p, ImagePart)]


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``: a conversation rendered by the tokenizer's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    top_logprobs: None = None
    tools: None = None
    tool_choice: None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict | None) -> dict | None:
        if value is not None and value != {"type": "text"}:
            raise ValueError("only response_format {'type': 'text'} is supported")
        return value

    def rendered_messages(self, image_placeholder: str | None = None) -> list[dict[str, str]]:
        """Plain ``{"role", "content"}`` dicts; OpenAI's newer "developer" role is the system role.

        With ``image_placeholder``, a message's images become that many placeholders at the start of its
        text, then a newline (LLaVA's ``<image>\\n`` + question, whatever the parts' order).
        """
        rendered = []
        for m in self.messages:
            text = m.text()
            n = len(m.image_urls())
            if image_placeholder is not None and n:
                text = image_placeholder * n + "\n" + text
            rendered.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        return rendered
