"""The chat prompt format: MobiLlama-Chat's template, and rendering any template with clear errors.

The MobiLlama-Chat format is written once, as a Jinja template (:data:`MOBILLAMA_CHAT_TEMPLATE`), so that
:meth:`~mobillama.tokenizer.Tokenizer.apply_chat_template`, transformers' ``apply_chat_template`` and
:func:`render_chat` (for tokenizers that carry no template) render the identical string; a tokenizer with its
own template keeps it. The message checks and the one-line error for a template that fails to render sit here
with it, so every caller (SFT masking, the server, the vision chat) gets the same behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mobillama.errors import MobiLlamaError
from mobillama.tokenizer.llama_format import EOS

DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# The MobiLlama-Chat prompt format (the released chat model's) as a Jinja template, so that our
# Tokenizer.apply_chat_template and transformers' apply_chat_template render the identical string:
#   <system line>\n### Human: {user}\n### Assistant: {reply}</s>\n### Human: ...\n### Assistant:
# A leading "system" message replaces the default system line. Each finished assistant reply ends with
# the EOS token so a fine-tuned model learns to stop; the generation prompt ends at "### Assistant:"
# (no trailing space: the reply's first token carries its own leading "▁").
MOBILLAMA_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] -}}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{{- '" + DEFAULT_SYSTEM_PROMPT.replace("'", "\\'") + "' -}}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '\\n### Human: ' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '\\n### Assistant: ' + message['content'] + eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('unsupported role ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '\\n### Assistant:' -}}"
    "{%- endif -%}"
)


def is_mobillama_template(template: str | None) -> bool:
    """Whether a chat template is MobiLlama-Chat's "### Human: / ### Assistant:" format (or none at all,
    which the project renders as MobiLlama-Chat)."""
    return not template or "### Human:" in template


def render_template(hf: Any, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """A transformers tokenizer's chat template rendered as text (as ``apply_chat_template`` renders it).

    A template that fails (a Jinja error, its own ``raise_exception``) is one MobiLlamaError line
    naming the template, not a traceback from inside Jinja.
    """
    try:
        return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except MobiLlamaError:
        raise
    except Exception as e:  # jinja2.TemplateError, and whatever else a template's expressions raise
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MobiLlamaError(f"the chat template failed to render these messages: {detail}") from None


def check_messages(messages: Sequence[dict]) -> None:
    """One clear error for a malformed conversation (the template itself would fail obscurely)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MobiLlamaError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise MobiLlamaError(f"message {i} must be a dict with 'role' and 'content' keys, got {m!r:.80}")
        if m["role"] not in ("system", "user", "assistant"):
            raise MobiLlamaError(f"message {i} has role {m['role']!r}; expected system, user or assistant")
        if m["role"] == "system" and i != 0:
            raise MobiLlamaError(f"message {i}: a system message may only come first")
        if not isinstance(m["content"], str):
            raise MobiLlamaError(f"message {i} content must be a string, got {type(m['content']).__name__}")


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True, eos_token: str = EOS) -> str:
    """MobiLlama-Chat rendering without a tokenizer object (for tokenizers that carry no template).

    Renders :data:`MOBILLAMA_CHAT_TEMPLATE` itself, so there is one definition of the format.
    """
    import jinja2

    check_messages(messages)

    def raise_exception(message: str):
        raise MobiLlamaError(message)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(MOBILLAMA_CHAT_TEMPLATE).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, eos_token=eos_token
    )
