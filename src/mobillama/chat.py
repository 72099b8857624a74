"""Interactive chat over :class:`~mobillama.generate.Generator`: history, streaming, commands, context guard.

The loop reads lines from any text stream and writes to any text stream, so it runs the same in a
terminal and in a test that feeds stdin. The prompt is rendered by the tokenizer's
``apply_chat_template`` (the MobiLlama-Chat "### Human / ### Assistant" format unless the tokenizer
carries its own template). When the conversation no longer fits the context with room for the reply,
the oldest turns are dropped, with a notice.
"""

from __future__ import annotations

import dataclasses
from typing import TextIO

from mobillama.generate import CHAT_STOP_STRINGS, Generator, SamplingParams

HELP = "commands: /reset clears the conversation, /exit quits"


def fit_history(
    generator: Generator, history: list[dict[str, str]], system: str | None, room: int
) -> tuple[list[int] | None, int]:
    """Token ids of the prompt for ``history`` (dropping oldest turns until ``room`` tokens are left).

    Returns (ids or None when even the last message alone does not fit, number of messages dropped).
    ``history`` is shortened in place.
    """
    tok = generator.tokenizer
    dropped = 0
    while history:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_bos=True)
        if len(ids) + room <= generator.context:
            return ids, dropped
        # Drop the oldest user turn and the assistant reply that answered it.
        cut = 2 if len(history) > 1 and history[1]["role"] == "assistant" else 1
        del history[:cut]
        dropped += cut
    return None, dropped


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
    params = dataclasses.replace(params, stop=tuple(dict.fromkeys((*params.stop, *CHAT_STOP_STRINGS))))
    history: list[dict[str, str]] = []
    print(HELP, file=stdout)
    while True:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            stdout.write("\n")
            break
        message = line.strip()
        if not message:
            continue
        if message == "/exit":
            break
        if message == "/reset":
            history.clear()
            print("[conversation cleared]", file=stdout)
            continue
        if message.startswith("/"):
            print(f"[unknown command {message.split()[0]}; {HELP}]", file=stdout)
            continue
        history.append({"role": "user", "content": message})
        ids, dropped = fit_history(generator, history, system, room=params.max_new_tokens)
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


__all__ = ["chat_loop", "fit_history"]
