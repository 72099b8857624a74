"""Assistant-only labels for chat SFT, derived from the chat template itself.

The loss must cover exactly the assistant's tokens (every assistant turn of a multi-turn conversation,
including the end-of-turn token the template emits) and nothing of the system or user text. Rather than
hard-code a template's layout, we find each assistant span by rendering the conversation twice with the
tokenizer's own template: up to the turn with a generation prompt, and through the turn. The span is the
difference. Tokens are then labelled by their character offsets (a fast tokenizer's offset mapping), so
the rule holds for any template that renders a conversation as a prefix-stable string.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mobillama.errors import MobiLlamaError
from mobillama.tokenizer import bos_prefix, render_template

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken


def _hf(tokenizer):
    return getattr(tokenizer, "hf", tokenizer)


def assistant_spans(tokenizer, conversation: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant replies."""
    hf = _hf(tokenizer)
    text = render_template(hf, conversation, add_generation_prompt=False)
    spans = []
    for k, turn in enumerate(conversation):
        if turn["role"] != "assistant":
            continue
        before = render_template(hf, conversation[:k], add_generation_prompt=True)
        through = render_template(hf, conversation[: k + 1], add_generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise MobiLlamaError(
                "the chat template does not render conversations as a stable prefix; "
                "cannot locate assistant turns for label masking"
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_conversation(tokenizer, conversation: list[dict[str, str]], max_length: int) -> Example | None:
    """Token ids and assistant-only labels, truncated to ``max_length``.

    Truncation keeps whole tokens and then drops any trailing tokens after the last assistant token, so
    a row never ends in a prompt the model is not trained to answer. Returns None when no assistant
    token survives truncation (the caller counts it as a skip).
    """
    hf = _hf(tokenizer)
    text, spans = assistant_spans(tokenizer, conversation)
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    labels = []
    for token, (start, end) in zip(ids, offsets):
        inside = any(start < s_end and end > s_start for s_start, s_end in spans)
        labels.append(token if inside else IGNORE_INDEX)
    # BOS as at inference (mobillama.tokenizer.bos_prefix): only where the tokenizer adds it, never twice
    bos = bos_prefix(tokenizer, text)
    ids, labels = [*bos, *ids], [IGNORE_INDEX] * len(bos) + labels
    return truncate(Example(ids, labels), max_length)


def truncate(example: Example, max_length: int) -> Example | None:
    """Cut to ``max_length`` whole tokens, then drop what follows the last assistant token (a dangling
    prompt); None when no assistant token survives."""
    ids, labels = example.input_ids[:max_length], example.labels[:max_length]
    last = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=None)
    if last is None:
        return None
    return Example(ids[: last + 1], labels[: last + 1])


def collate(examples: list[Example], pad_id: int, pack_to: int | None = None) -> dict[str, torch.Tensor]:
    """A training batch. Without packing: right-padded rows with an attention mask. With ``pack_to``:
    examples concatenated into rows of at most ``pack_to`` tokens with ``segment_ids``, so attention stays
    inside each conversation (the model restarts positions per segment).
    """
    if pack_to is None:
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            ids[row, :n], labels[row, :n], mask[row, :n] = (
                torch.tensor(e.input_ids),
                torch.tensor(e.labels),
                1,
            )
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    rows: list[list[Example]] = [[]]
    for e in examples:
        if len(e.input_ids) > pack_to:
            raise ValueError(f"example of {len(e.input_ids)} tokens does not fit a packed row of {pack_to}")
        if sum(len(x.input_ids) for x in rows[-1]) + len(e.input_ids) > pack_to:
            rows.append([])
        rows[-1].append(e)
    ids = torch.full((len(rows), pack_to), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), pack_to), IGNORE_INDEX, dtype=torch.long)
    segments = torch.full((len(rows), pack_to), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, e in enumerate(row):
            n = len(e.input_ids)
            ids[r, at : at + n], labels[r, at : at + n], segments[r, at : at + n] = (
                torch.tensor(e.input_ids),
                torch.tensor(e.labels),
                s,
            )
            at += n
        segments[r, at:] = len(row)  # padding is its own segment, fully ignored by the labels
    return {"input_ids": ids, "labels": labels, "segment_ids": segments}
