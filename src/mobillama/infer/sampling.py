"""Choosing tokens and deciding where text ends: sampling parameters, sampling, and stop strings.

One module for what every generation path shares, so the generator (:mod:`mobillama.infer.generator`),
the terminal chat (:mod:`mobillama.infer.chat`) and the server (:mod:`mobillama.serve`) agree on it:

- :class:`SamplingParams` (checked once, at construction) and :class:`Completion` (one prompt's result);
- :func:`sample_next`: repetition penalty, temperature, top-k, top-p, the draw;
- stop strings (defined in :mod:`mobillama.infer.stops`, torch-free, re-exported here): :func:`find_stop`
  cuts text at the first one, :func:`held_back` says how much of a streamed text's tail must wait because
  it could still become one; and the chat stop strings (:func:`chat_stop_strings`: ``### Human:`` for the
  MobiLlama-Chat template only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mobillama.errors import MobiLlamaError
from mobillama.infer.stops import cut_at_stop, find_stop, held_back
from mobillama.tokenizer import DEFAULT_SYSTEM_PROMPT, is_mobillama_template

if TYPE_CHECKING:  # torch is imported where tokens are sampled: the lean runtime checks SamplingParams
    import torch  # in a process without it

# The MobiLlama-Chat prompt format is defined once, in mobillama.tokenizer.
MOBILLAMA_CHAT_SYSTEM = DEFAULT_SYSTEM_PROMPT
CHAT_STOP_STRINGS = ("### Human:",)


def chat_stop_strings(tokenizer: Any) -> tuple[str, ...]:
    """The stop strings a chat adds: MobiLlama-Chat's ``### Human:`` only for a tokenizer whose template is
    MobiLlama-Chat (or that has none, and so is rendered with it). A ChatML model ends its turn with a
    stop token instead, and "### Human:" may be ordinary text in its answer."""
    template = getattr(getattr(tokenizer, "hf", tokenizer), "chat_template", None)
    return CHAT_STOP_STRINGS if is_mobillama_template(template) else ()


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` means greedy (argmax)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stop_at_eos: bool = True  # stop at the tokenizer's stop tokens (EOS, end of turn, ...)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        def number(name: str, value: Any, kind: type) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise MobiLlamaError(
                    f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}"
                )

        number("max_new_tokens", self.max_new_tokens, int)
        number("temperature", self.temperature, float)
        number("top_k", self.top_k, int)
        number("top_p", self.top_p, float)
        number("repetition_penalty", self.repetition_penalty, float)
        if self.max_new_tokens < 1:
            raise MobiLlamaError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise MobiLlamaError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise MobiLlamaError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MobiLlamaError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise MobiLlamaError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise MobiLlamaError(f"seed must be an integer, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise MobiLlamaError(f"stop strings must be non-empty strings, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One prompt's result. ``finish_reason`` is "stop" (a stop token or string) or "length";
    ``stop_token`` is the stop token that ended it (counted, but in neither ``token_ids`` nor ``text``)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stop_token: int | None = None


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as in transformers): seen tokens' positive logits / p, negative ones * p."""
    if penalty == 1.0:
        return logits
    import torch

    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row from fp32 logits [B, vocab]: penalty, temperature, top-k, top-p, draw."""
    import torch

    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p (the first always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


__all__ = [
    "CHAT_STOP_STRINGS",
    "MOBILLAMA_CHAT_SYSTEM",
    "Completion",
    "SamplingParams",
    "apply_repetition_penalty",
    "chat_stop_strings",
    "cut_at_stop",
    "find_stop",
    "held_back",
    "sample_next",
]
