"""Interactive chat over :class:`~mobillama.infer.generator.Generator`: history, streaming, commands,
context guard.

:func:`vision_chat_loop` is the same conversation for a MobiLlama-V checkpoint: an image attached to the
first user turn (``/image PATH`` switches it and starts over), the reply streamed token by token through
the same generator, and the same context guard with the image's tokens counted.

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
from functools import partial
from typing import Any, TextIO

from mobillama.errors import MobiLlamaError
from mobillama.infer.generator import Generator, drain
from mobillama.infer.sampling import SamplingParams, chat_stop_strings
from mobillama.tokenizer import encode_prompt
from mobillama.vision.chat import image_prompt_ids, prompt_length, stream_answer
from mobillama.vision.data import read_image_file

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


def with_chat_stops(params: SamplingParams, tokenizer: Any) -> SamplingParams:
    """``params`` with the chat's stop strings added (``### Human:`` for the MobiLlama-Chat template)."""
    return dataclasses.replace(
        params, stop=tuple(dict.fromkeys((*params.stop, *chat_stop_strings(tokenizer))))
    )


def _show(stdout: TextIO) -> Callable[[int, str], None]:
    def show(_row: int, delta: str) -> None:
        stdout.write(delta)
        stdout.flush()

    return show


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
    params = with_chat_stops(params, generator.tokenizer)
    history: list[dict[str, str]] = []
    for message in _user_messages(stdin, stdout, prompt, HELP, history):
        history.append({"role": "user", "content": message})
        ids = _fitted(
            stdout, history, partial(fit_history, generator, history, system, params.max_new_tokens)
        )
        if ids is None:
            continue
        completion = generator.generate_ids([ids], params, on_text=_show(stdout))[0]
        stdout.write("\n")
        history.append({"role": "assistant", "content": completion.text.strip()})
    return history


def _fitted(
    stdout: TextIO, history: list[dict[str, str]], fit: Callable[[], tuple[list[int] | None, int]]
) -> list[int] | None:
    """The prompt ids of ``history`` by ``fit`` (which drops the oldest turns to make room), with the
    notices the user sees; None when the message is not sent (it was taken back from ``history`` if
    the chat template refused it)."""
    try:
        ids, dropped = fit()
    except MobiLlamaError as e:  # the chat template refused the conversation (or a literal <image>)
        history.pop()
        print(f"[{e}; not sent]", file=stdout)
        return None
    if dropped:
        print(f"[context full: dropped the {dropped} oldest message(s)]", file=stdout)
    if ids is None:
        print("[message too long for the model's context; not sent]", file=stdout)
    return ids


def fit_vision_history(
    model: Any, tokenizer: Any, history: list[dict[str, str]], system: str | None, n_images: int, room: int
) -> tuple[list[int] | None, int]:
    """:func:`fit_history` for a MobiLlama-V model: the length counts each image's N tokens. The image
    stays attached to whichever user turn is first after the oldest ones are dropped."""

    def render(messages: list[dict[str, str]]) -> tuple[list[int], int]:
        ids = image_prompt_ids(tokenizer, messages, n_images)
        return ids, prompt_length(model, ids)

    return _drop_oldest_until_fits(history, system, render, model.config.max_position_embeddings - room)


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
    until ``/exit`` or end of input; returns the final history. Replies stream as they are generated."""
    generator = Generator(model.decoder, tokenizer)
    params = with_chat_stops(params, tokenizer)
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
        images = [] if current["image"] is None else [current["image"]]
        history.append({"role": "user", "content": message})
        fit = partial(
            fit_vision_history, model, tokenizer, history, system, len(images), params.max_new_tokens
        )
        ids = _fitted(stdout, history, fit)
        if ids is None:
            continue
        stream = stream_answer(generator, model, processor, ids, images, params)
        completion = drain(stream, _show(stdout))[0]
        stdout.write("\n")
        history.append({"role": "assistant", "content": completion.text})
    return history


__all__ = ["chat_loop", "fit_history", "fit_vision_history", "vision_chat_loop", "with_chat_stops"]
