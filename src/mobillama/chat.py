"""Interactive chat over :class:`~mobillama.generate.Generator`: history, streaming, commands, context guard.

:func:`vision_chat_loop` is the same conversation for a MobiLlama-V checkpoint: an image attached to the
first user turn (``/image PATH`` switches it and starts over), the reply printed when complete (the
vision model's generate does not stream), and the same context guard with the image's tokens counted.

The loop reads lines from any text stream and writes to any text stream, so it runs the same in a
terminal and in a test that feeds stdin. The prompt is rendered by the tokenizer's
``apply_chat_template`` (the MobiLlama-Chat "### Human / ### Assistant" format unless the tokenizer
carries its own template) and tokenized with the tokenizer's BOS rule (a ChatML prompt that begins with
``<|im_start|>`` gets no BOS in front); the reply ends at the tokenizer's stop tokens, and at the
"### Human:" stop string only for the MobiLlama-Chat template. When the conversation no longer fits the
context with room for the reply, the oldest turns are dropped, with a notice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from mobillama.errors import MobiLlamaError
from mobillama.generate import Generator, SamplingParams, chat_stop_strings
from mobillama.tokenizer import encode_prompt

HELP = "commands: /reset clears the conversation, /exit quits"
VISION_HELP = "commands: /image PATH switches the image (and clears the conversation), /reset, /exit"


def fit_history(
    generator: Generator, history: list[dict[str, str]], system: str | None, room: int
) -> tuple[list[int] | None, int]:
    """Token ids of the prompt for ``history`` (dropping oldest turns until ``room`` tokens are left).

    Returns (ids or None when even the last message alone does not fit, number of messages dropped).
    ``history`` is shortened in place.
    """
    tok = generator.tokenizer

    def render(messages: list[dict[str, str]]) -> tuple[list[int], int]:
        ids = encode_prompt(tok, tok.apply_chat_template(messages, add_generation_prompt=True))
        return ids, len(ids)

    return _drop_oldest_until_fits(history, system, render, generator.context - room)


def _drop_oldest_until_fits(
    history: list[dict[str, str]],
    system: str | None,
    render: Callable[[list[dict[str, str]]], tuple[list[int], int]],
    budget: int,
) -> tuple[list[int] | None, int]:
    """Drop the oldest user turn (and the reply that answered it) until ``render(messages)``'s length
    is within ``budget``; returns (ids or None, messages dropped). Shared by the text and vision chats."""
    dropped = 0
    while history:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids, length = render(messages)
        if length <= budget:
            return ids, dropped
        cut = 2 if len(history) > 1 and history[1]["role"] == "assistant" else 1
        del history[:cut]
        dropped += cut
    return None, dropped


def _user_messages(
    stdin: TextIO,
    stdout: TextIO,
    prompt: str,
    help_text: str,
    history: list[dict[str, str]],
    commands: dict[str, Callable[[str], None]] | None = None,
) -> Iterator[str]:
    """The user's messages, one per input line, until ``/exit`` or end of input; ``/reset`` clears
    ``history``, a command in ``commands`` is called with the rest of its line, others are refused."""
    commands = commands or {}
    print(help_text, file=stdout)
    while True:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            stdout.write("\n")
            return
        message = line.strip()
        if not message:
            continue
        if message == "/exit":
            return
        if message == "/reset":
            history.clear()
            print("[conversation cleared]", file=stdout)
            continue
        if message.startswith("/"):
            name, _, rest = message.partition(" ")
            if name in commands:
                commands[name](rest.strip())
            else:
                print(f"[unknown command {name}; {help_text}]", file=stdout)
            continue
        yield message


def chat_loop(
    generator: Generator,
    params: SamplingParams,
    stdin: TextIO,
    stdout: TextIO,
    *,
    system: str | None = None,
    prompt: str = ">>> ",
) -> list[dict[str, str]]:
    """Run the chat until ``/exit`` or end of input; returns the final history."""
    extra = chat_stop_strings(generator.tokenizer)
    params = dataclasses.replace(params, stop=tuple(dict.fromkeys((*params.stop, *extra))))
    history: list[dict[str, str]] = []
    for message in _user_messages(stdin, stdout, prompt, HELP, history):
        history.append({"role": "user", "content": message})
        try:
            ids, dropped = fit_history(generator, history, system, room=params.max_new_tokens)
        except MobiLlamaError as e:  # the chat template refused the conversation
            history.pop()
            print(f"[{e}; not sent]", file=stdout)
            continue
        if dropped:
            print(f"[context full: dropped the {dropped} oldest message(s)]", file=stdout)
        if ids is None:
            print("[message too long for the model's context; not sent]", file=stdout)
            continue

        def show(_row: int, delta: str) -> None:
            stdout.write(delta)
            stdout.flush()

        completion = generator.generate_ids([ids], params, on_text=show)[0]
        stdout.write("\n")
        history.append({"role": "assistant", "content": completion.text.strip()})
    return history


def fit_vision_history(
    model: Any, tokenizer: Any, history: list[dict[str, str]], system: str | None, n_images: int, room: int
) -> tuple[list[int] | None, int]:
    """:func:`fit_history` for a MobiLlama-V model: the length counts each image's N tokens. The image
    stays attached to whichever user turn is first after the oldest ones are dropped."""
    from mobillama.vision.chat import image_prompt_ids, prompt_length

    def render(messages: list[dict[str, str]]) -> tuple[list[int], int]:
        ids = image_prompt_ids(tokenizer, messages, n_images)
        return ids, prompt_length(model, ids)

    return _drop_oldest_until_fits(history, system, render, model.config.max_position_embeddings - room)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found (the vision model's generate
    stops only at EOS, so stop strings are applied to the finished text)."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if at < 0 else (text[:at], True)


def vision_chat_loop(
    model: Any,
    tokenizer: Any,
    processor: Any,
    params: SamplingParams,
    stdin: TextIO,
    stdout: TextIO,
    *,
    image: Any = None,
    system: str | None = None,
    prompt: str = ">>> ",
) -> list[dict[str, str]]:
    """Chat with a MobiLlama-V model about ``image`` (a Pillow image, or None for text-only turns)
    until ``/exit`` or end of input; returns the final history. ``repetition_penalty`` is not applied."""
    from mobillama.vision.chat import generate_from_ids
    from mobillama.vision.data import read_image_file

    stops = tuple(dict.fromkeys((*params.stop, *chat_stop_strings(tokenizer))))
    history: list[dict[str, str]] = []
    current = {"image": image}

    def switch_image(path: str) -> None:
        if not path:
            print("[usage: /image PATH]", file=stdout)
            return
        try:
            current["image"] = read_image_file(path)
        except MobiLlamaError as e:
            print(f"[{e}; image unchanged]", file=stdout)
            return
        history.clear()
        print(f"[image: {path}; conversation cleared]", file=stdout)

    for message in _user_messages(stdin, stdout, prompt, VISION_HELP, history, {"/image": switch_image}):
        image = current["image"]
        history.append({"role": "user", "content": message})
        images = [] if image is None else [image]
        try:
            ids, dropped = fit_vision_history(
                model, tokenizer, history, system, len(images), room=params.max_new_tokens
            )
        except MobiLlamaError as e:  # e.g. a literal <image> typed into the message
            history.pop()
            print(f"[{e}; not sent]", file=stdout)
            continue
        if dropped:
            print(f"[context full: dropped the {dropped} oldest message(s)]", file=stdout)
        if ids is None:
            print("[message too long for the model's context; not sent]", file=stdout)
            continue
        answer = generate_from_ids(
            model,
            tokenizer,
            processor,
            ids,
            images,
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=params.seed,
        )
        text, _ = cut_at_stop(answer.text, stops)
        print(text.strip(), file=stdout)
        history.append({"role": "assistant", "content": text.strip()})
    return history


__all__ = ["chat_loop", "cut_at_stop", "fit_history", "fit_vision_history", "vision_chat_loop"]
