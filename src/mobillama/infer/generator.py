"""The one generation loop: prompts in, streamed text and completions out.

The CLI (generate, chat), the server, evaluation and MobiLlama-V all call :class:`Generator`: a prompt is
token ids (:meth:`Generator.iter_ids`) or, for a MobiLlama-V prompt whose image placeholders have become
image embeddings, input embeddings (:meth:`Generator.iter_embeds`); from the prefill on, both run the
same loop: sample (:mod:`mobillama.infer.sampling`), decode one token (:mod:`mobillama.infer.decoder`),
detokenize, match stop tokens and stop strings, and yield the text that has become final.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Callable, Collection, Iterator, Sequence
from functools import partial
from typing import Protocol

import torch

from mobillama.errors import MobiLlamaError
from mobillama.infer.decoder import FastDecoder
from mobillama.infer.sampling import Completion, SamplingParams, sample_next
from mobillama.infer.stops import TextRow
from mobillama.model import MobiLlama
from mobillama.tokenizer import encode_prompt, stop_ids

# What the loop yields and finally returns: (row, text delta) events, then the rows' completions.
Stream = Iterator[tuple[int, str]]


class TokenizerLike(Protocol):
    """The part of ``mobillama.tokenizer.Tokenizer`` generation uses (the data stage's contract).

    ``encode_prompt`` and ``stop_ids`` may be missing from a minimal stand-in (the tests' byte
    tokenizers): prompts then get BOS and generation stops at ``eos_id`` (see
    :func:`mobillama.tokenizer.encode_prompt`). A transformers tokenizer works too (MobiLlama-V's).
    """

    eos_id: int
    bos_id: int
    pad_id: int | None
    stop_ids: tuple[int, ...]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def encode_prompt(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str: ...


class Generator:
    """Generate from a model and a tokenizer (anything with :class:`TokenizerLike`'s interface).

    One object serves many requests: the static cache is kept and reused while requests fit it.
    """

    def __init__(self, model: MobiLlama, tokenizer: TokenizerLike | None = None, *, compile: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.decoder = FastDecoder(model, compile=compile)
        self.context = model.config.max_position_embeddings
        # Every object alive now (modules, tokenizer, the imported libraries: ~10^5 of them) is long-lived.
        # Frozen, Python's cyclic collector no longer re-walks them in each full collection, which the
        # tensors a decode step allocates trigger every few dozen tokens (5-8% of decode time profiled).
        gc.freeze()

    def sibling(self) -> Generator:
        """Another generator over the same model weights and tokenizer with a cache of its own (one per
        server worker thread)."""
        return type(self)(self.model, self.tokenizer, compile=self.decoder.compiled)

    # ---- input checks --------------------------------------------------------------------------
    def encode_prompts(self, prompts: str | Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
        """Token ids of text prompts. ``add_bos=None`` follows the tokenizer's rule (BOS only where it adds
        one to plain text, never twice, see :func:`mobillama.tokenizer.encode_prompt`); True/False force it."""
        if self.tokenizer is None:
            raise MobiLlamaError("this generator has no tokenizer: pass token ids instead of text")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise MobiLlamaError("no prompts given")
        out = []
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise MobiLlamaError(f"prompt {i} must be a string, got {type(p).__name__}")
            if not p:
                raise MobiLlamaError(f"prompt {i} is empty")
            if add_bos is None:
                out.append(encode_prompt(self.tokenizer, p))
            else:
                out.append(self.tokenizer.encode(p, add_bos=add_bos))
        return out

    def _check_lengths(self, lengths: Sequence[int]) -> None:
        if not lengths:
            raise MobiLlamaError("no prompts given")
        for i, n in enumerate(lengths):
            if n == 0:
                raise MobiLlamaError(f"prompt {i} is empty")
            if n >= self.context:
                raise MobiLlamaError(
                    f"prompt {i} has {n} tokens; the model's context is {self.context} "
                    "(leave room for at least one new token)"
                )

    def _check_ids(self, prompt_ids: Sequence[Sequence[int]]) -> None:
        self._check_lengths([len(ids) for ids in prompt_ids])
        vocab = self.model.config.vocab_size
        for i, ids in enumerate(prompt_ids):
            bad = next(
                (t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None
            )
            if bad is not None:
                raise MobiLlamaError(f"prompt {i} has token id {bad!r} outside the vocabulary [0, {vocab})")

    # ---- the two ways in ---------------------------------------------------------------------------
    def iter_ids(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> Stream:
        """Yield ``(row, text_delta)`` as text becomes final; return the list of :class:`Completion`.

        Stop strings are matched on the decoded text, so one that spans several tokens is found; text
        that could still turn into a stop string (or is an incomplete UTF-8 sequence) is held back
        until it is decided. Without a tokenizer no text is produced (ids only; the model's EOS still
        stops). With one, any of its stop tokens (EOS, the chat template's end-of-turn token, the
        checkpoint's generation_config ids) ends a row; the stop token is in neither ids nor text.
        """
        self._check_params(params)
        self._check_ids(prompt_ids)
        pad_id = getattr(self.tokenizer, "pad_id", None) or 0
        width = max(len(p) for p in prompt_ids)
        ids = torch.tensor(
            [[pad_id] * (width - len(p)) + list(p) for p in prompt_ids], device=self.decoder.device
        )
        lengths = [len(p) for p in prompt_ids]
        return (yield from self._loop(lengths, params, partial(self.decoder.prefill, ids), prompt_ids))

    def iter_embeds(
        self,
        embeds: torch.Tensor,
        lengths: Sequence[int],
        params: SamplingParams,
        *,
        seen_ids: Sequence[Sequence[int]] | None = None,
        stop_tokens: Collection[int] | None = None,
    ) -> Stream:
        """:meth:`iter_ids` for prompts given as input embeddings [B, T, H], row b's ``lengths[b]``
        positions last (left padding): a MobiLlama-V prompt, its image placeholders already replaced by
        the image's tokens. ``seen_ids`` are the token ids the repetition penalty counts as seen (the
        text tokens); ``stop_tokens`` replaces the tokenizer's stop ids."""
        self._check_params(params)
        lengths = [int(n) for n in lengths]
        self._check_lengths(lengths)
        if embeds.shape[0] != len(lengths) or embeds.shape[1] != max(lengths):
            raise MobiLlamaError(f"embeddings of shape {tuple(embeds.shape)} do not match lengths {lengths}")
        seen = seen_ids if seen_ids is not None else [[] for _ in lengths]
        prefill = partial(self.decoder.prefill_embeds, embeds)
        return (yield from self._loop(lengths, params, prefill, seen, stop_tokens))

    def _check_params(self, params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise MobiLlamaError("params must be a SamplingParams")
        if params.stop and self.tokenizer is None:
            raise MobiLlamaError("stop strings need a tokenizer")

    # ---- the loop ------------------------------------------------------------------------------
    def _loop(
        self,
        lengths: list[int],
        params: SamplingParams,
        prefill: Callable[[], torch.Tensor],
        seen_ids: Sequence[Sequence[int]],
        stop_tokens: Collection[int] | None = None,
    ) -> Stream:
        tok = self.tokenizer
        if stop_tokens is None:
            stop_tokens = stop_ids(tok) if tok is not None else (self.model.config.eos_token_id,)
        stops = frozenset(stop_tokens)
        T, B = max(lengths), len(lengths)
        new_tokens = min(params.max_new_tokens, self.context - T)
        rows = [TextRow(prompt_tokens=n) for n in lengths]
        device = self.decoder.device
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, self.model.config.vocab_size, dtype=torch.bool, device=device)
            for b, ids in enumerate(seen_ids):  # the prompt's own tokens (padding is not seen)
                seen[b, torch.tensor([t for t in ids if t >= 0], dtype=torch.long, device=device)] = True

        self.decoder.start([T - n for n in lengths], T + new_tokens)
        logits = prefill()
        for step in range(new_tokens):
            next_tokens = sample_next(logits, params, generator, seen)
            if seen is not None:
                seen.scatter_(1, next_tokens[:, None], True)
            for b, t in enumerate(next_tokens.tolist()):
                row = rows[b]
                if row.finish_reason is not None:
                    continue
                decode = self.tokenizer.decode if self.tokenizer is not None else None
                delta = row.advance(
                    t, stops, params.stop, decode, stop_at_eos=params.stop_at_eos, last=step == new_tokens - 1
                )
                if delta:
                    yield b, delta
            if all(r.finish_reason is not None for r in rows):
                break
            logits = self.decoder.decode(next_tokens, T + step)
        return [
            Completion(r.text, r.ids, r.finish_reason or "length", r.prompt_tokens, r.generated, r.stop_token)
            for r in rows
        ]

    # ---- conveniences --------------------------------------------------------------------------
    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[Completion]:
        """Generate for already-tokenized prompts (batched, left-padded); ``on_text(row, delta)`` streams."""
        return drain(self.iter_ids(prompt_ids, params), on_text)

    def generate(
        self,
        prompts: str | Sequence[str],
        params: SamplingParams | None = None,
        on_text: Callable[[int, str], None] | None = None,
        add_bos: bool | None = None,
    ) -> list[Completion]:
        """Generate for one or several text prompts (several are batched with left padding); BOS as
        :meth:`encode_prompts` puts it."""
        return self.generate_ids(self.encode_prompts(prompts, add_bos), params or SamplingParams(), on_text)

    def stream(
        self, prompt: str, params: SamplingParams | None = None, add_bos: bool | None = None
    ) -> Iterator[str]:
        """Yield the text of one prompt's completion as it is produced."""
        for _, delta in self.iter_ids(self.encode_prompts(prompt, add_bos), params or SamplingParams()):
            yield delta


def drain(stream: Stream, on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Run a stream to its end, passing each ``(row, delta)`` to ``on_text``; returns its completions."""
    while True:
        try:
            row, delta = next(stream)
        except StopIteration as done:
            return done.value
        if on_text is not None:
            on_text(row, delta)


def strip_stream(stream: Stream) -> Stream:
    """``stream`` with every row's text stripped of surrounding whitespace, still token by token:
    leading whitespace is dropped, trailing whitespace waits until text follows it (MobiLlama-V answers
    are shown stripped, as a finished answer was)."""
    pending: dict[int, str] = {}
    started: set[int] = set()
    try:
        while True:
            try:
                row, delta = next(stream)
            except StopIteration as done:
                completions: list[Completion] = done.value
                break
            if row not in started:
                delta = delta.lstrip()
                if not delta:
                    continue
                started.add(row)
            text = pending.pop(row, "") + delta
            body = text.rstrip()
            if len(body) < len(text):
                pending[row] = text[len(body) :]
            if body:
                yield row, body
    finally:
        stream.close()
    for c in completions:
        c.text = c.text.strip()
    return completions


def reference_greedy(model: MobiLlama, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by re-running the full reference forward every step (slow; the test oracle)."""
    ids = torch.tensor([list(prompt_ids)])
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            nxt = int(model(ids)[0, -1].float().argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


__all__ = ["Generator", "TokenizerLike", "drain", "reference_greedy", "strip_stream"]
