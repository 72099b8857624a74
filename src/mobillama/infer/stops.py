"""Where generated text ends: stop strings, and one completion's bookkeeping token by token. Plain Python
(no torch), shared by the PyTorch runtime's generator (stop strings also through
:mod:`mobillama.infer.sampling`, which re-exports them) and the lean runtime, so both end text alike."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Where the first stop string in ``text`` begins, or -1 when there is none."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    at = find_stop(text, stops)
    return (text, False) if at < 0 else (text[:at], True)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of a streamed text must wait: an incomplete UTF-8 sequence (decoded
    as U+FFFD) or a prefix of a stop string, which the next tokens may complete."""
    hold = 0
    while hold < len(text) and text[len(text) - 1 - hold] == "\ufffd":
        hold += 1
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


@dataclass
class TextRow:
    """One completion as it grows: its ids, text, how much text was handed out, and why it ended."""

    prompt_tokens: int
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    generated: int = 0  # tokens produced, the stop token included (ids excludes it)
    finish_reason: str | None = None
    stop_token: int | None = None

    def advance(
        self,
        token: int,
        stop_ids: Collection[int],
        stops: Sequence[str],
        decode: Callable[[list[int]], str] | None,
        *,
        stop_at_eos: bool = True,
        last: bool = False,
    ) -> str:
        """Append one token, decide whether the row finished, and return the text now final: a stop id
        ends it (counted, but in neither ids nor text), a stop string cuts it, ``last`` ends it by length;
        an incomplete UTF-8 character or a possible stop-string prefix waits (:func:`held_back`)."""
        self.generated += 1
        if stop_at_eos and token in stop_ids:
            self.finish_reason, self.stop_token = "stop", token
        else:
            self.ids.append(token)
            if decode is not None:
                self.text = decode(self.ids)
                at = find_stop(self.text, stops)
                if at >= 0:
                    self.text = self.text[:at]
                    self.finish_reason = "stop"
        if last and self.finish_reason is None:
            self.finish_reason = "length"
        end = len(self.text) if self.finish_reason else len(self.text) - held_back(self.text, stops)
        delta = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta
