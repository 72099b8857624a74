"""Stop strings: where generated text ends. Plain Python (no torch), shared by the PyTorch runtime's
generator (through :mod:`mobillama.infer.sampling`, which re-exports these) and the lean runtime."""

from __future__ import annotations

from collections.abc import Sequence


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
