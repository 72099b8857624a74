"""Conversation files in the common formats, normalised to ``[{"role", "content"}, ...]``.

Accepted record shapes (one JSON object per line, or a JSON array of objects):

- ShareGPT / FastChat: ``{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}``
- OpenAI messages:    ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}``
- Alpaca:             ``{"instruction": "...", "input": "...", "output": "..."}``

A record that cannot be used (no assistant turn, unknown role, empty message, not JSON) is skipped and
counted with its reason, so a run log can say exactly what was dropped; a file whose records mix
formats is an error, because that is almost always a concatenation mistake.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mobillama.errors import MobiLlamaError

Conversation = list[dict[str, str]]

ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}


@dataclass
class LoadReport:
    """What a load kept and what it skipped, by reason (first few line numbers kept as examples)."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(line)

    def to_dict(self) -> dict:
        return {"kept": self.kept, "skipped": dict(self.skipped), "skipped_examples_lines": self.examples}


def detect_format(record: dict) -> str | None:
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def normalise(record: dict, fmt: str) -> Conversation:
    """One record as a role/content list; raises ValueError(reason) when it cannot be used."""
    if fmt == "alpaca":
        instruction, extra, output = (
            record.get("instruction"),
            record.get("input") or "",
            record.get("output"),
        )
        if not all(isinstance(x, str) for x in (instruction, extra, output)):
            raise ValueError("alpaca fields must be strings")
        prompt = instruction.strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output.strip()}]
    else:
        raw = record["conversations"] if fmt == "sharegpt" else record["messages"]
        role_key, text_key = ("from", "value") if fmt == "sharegpt" else ("role", "content")
        if not isinstance(raw, list):
            raise ValueError(f"'{'conversations' if fmt == 'sharegpt' else 'messages'}' is not a list")
        turns = []
        for turn in raw:
            if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
                raise ValueError("a turn is not an object with a string text")
            role = ROLE_ALIASES.get(str(turn.get(role_key, "")).lower())
            if role is None:
                raise ValueError(f"unknown role {turn.get(role_key)!r}")
            turns.append({"role": role, "content": turn[text_key].strip()})
    if any(not t["content"] for t in turns):
        raise ValueError("empty message")
    if not any(t["role"] == "assistant" for t in turns):
        raise ValueError("no assistant turn")
    if turns[0]["role"] == "assistant" or (
        turns[0]["role"] == "system" and len(turns) > 1 and turns[1]["role"] == "assistant"
    ):
        raise ValueError("conversation starts with the assistant")
    return turns


def load_conversations(path: str | Path, fmt: str = "auto") -> tuple[list[Conversation], LoadReport]:
    """Read a JSONL (or JSON array) conversation file; returns the usable conversations and a skip report."""
    path = Path(path)
    if not path.is_file():
        raise MobiLlamaError(f"conversation file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MobiLlamaError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = list(enumerate(json.loads(stripped), start=1))
        except json.JSONDecodeError as e:
            raise MobiLlamaError(f"{path}: not valid JSON ({e})") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError:
                    records.append((number, None))
    report = LoadReport()
    conversations: list[Conversation] = []
    chosen = None if fmt == "auto" else fmt
    for number, record in records:
        if not isinstance(record, dict):
            report.skip("not a JSON object", number)
            continue
        found = detect_format(record)
        if found is None:
            report.skip("unrecognised record format", number)
            continue
        if chosen is None:
            chosen = found
        elif found != chosen:
            raise MobiLlamaError(
                f"{path}: line {number} is a {found} record but the file is {chosen}; "
                f"one file must use one format"
            )
        try:
            conversations.append(normalise(record, chosen))
            report.kept += 1
        except ValueError as e:
            report.skip(str(e), number)
    if not conversations:
        raise MobiLlamaError(
            f"{path}: no usable conversations (skipped: {dict(report.skipped) or 'file is empty'})"
        )
    return conversations, report
