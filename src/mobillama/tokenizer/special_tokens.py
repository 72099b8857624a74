"""Special-token conventions: BOS for plain text, the document separator, the ids that end generation.

Imported tokenizers keep their own rules, read from their files and never guessed from a model name:
tokenizer_config.json's ``add_bos_token`` (else whether the post-processor puts BOS first), ``<|endoftext|>``
as the document separator where it is special, EOS plus the chat template's end-of-turn tokens plus
generation_config.json's ids as stop ids (:class:`Conventions`, :func:`derive_conventions`). The helpers here
(:func:`conventions`, :func:`bos_prefix`, :func:`encode_prompt`, :func:`stop_ids`) apply the same rules to a
:class:`~mobillama.tokenizer.Tokenizer`, a bare transformers tokenizer or a test double, so generation, SFT,
evaluation and the vision code never decide BOS or stops themselves.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mobillama.errors import MobiLlamaError
from mobillama.tokenizer.llama_format import CONFIG_FILE, GENERATION_CONFIG_FILE

# The GPT-2 family's document separator (SmolLM2, Qwen, ...): used between documents when it is a special token.
END_OF_TEXT = "<|endoftext|>"
# End-of-turn tokens of common chat templates (ChatML, Llama-3, Gemma, Phi-3): generation stops at any of them
# that the vocabulary holds as a special token, besides EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


# ---- special-token conventions -------------------------------------------------------------------------
@dataclass(frozen=True)
class Conventions:
    """A tokenizer's special-token rules, derived from its files (see :func:`derive_conventions`)."""

    add_bos: bool  # BOS goes in front of plain text (prompts, documents)
    bos_id: int | None
    bos_token: str | None
    end_of_text_id: int | None  # the document separator of corpus preparation
    stop_ids: tuple[int, ...]  # ids that end generation


def special_token_ids(hf: Any) -> dict[str, int]:
    """Content → id of the vocabulary's special tokens (added tokens marked special)."""
    return {t.content: i for i, t in hf.added_tokens_decoder.items() if t.special}


def derive_conventions(
    hf: Any, add_bos_token: bool | None = None, extra_stop_ids: Sequence[int] = ()
) -> Conventions:
    """The special-token rules of an HF tokenizer.

    - ``add_bos``: tokenizer_config.json's ``add_bos_token`` when the files have it (``add_bos_token``);
      else whether the post-processor puts BOS first when encoding with special tokens (Llama's
      TemplateProcessing does; GPT-2's ByteLevel does not).
    - ``end_of_text_id``: ``<|endoftext|>`` where it is a special token (GPT-2 convention), else EOS.
    - ``stop_ids``: EOS, the end-of-turn tokens of :data:`END_OF_TURN_TOKENS` that are special tokens,
      the end-of-text separator (a document ends there), then ``extra_stop_ids`` inside the vocabulary.
    """
    bos_id = hf.bos_token_id
    if isinstance(add_bos_token, bool):
        add_bos = add_bos_token and bos_id is not None
    elif bos_id is None:
        add_bos = False
    else:
        probe = hf.backend_tokenizer.encode("x", add_special_tokens=True).ids
        add_bos = bool(probe) and probe[0] == bos_id
    special = special_token_ids(hf)
    eos_id = hf.eos_token_id
    end_of_text = special.get(END_OF_TEXT, eos_id)
    vocab = len(hf)
    stops = [eos_id, *(special.get(t) for t in END_OF_TURN_TOKENS), end_of_text, *extra_stop_ids]
    stop_ids = tuple(dict.fromkeys(i for i in stops if isinstance(i, int) and 0 <= i < vocab))
    return Conventions(add_bos, bos_id, hf.bos_token, end_of_text, stop_ids)


_HF_CONVENTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def conventions(tokenizer: Any) -> Conventions:
    """:class:`Conventions` of a :class:`Tokenizer` or of a bare transformers tokenizer.

    A transformers tokenizer loaded from a directory (``AutoTokenizer``, as the vision and eval code do)
    gets the same rules as :func:`load_tokenizer` would give: its directory's tokenizer_config.json and
    generation_config.json are read (once; the result is cached per object).
    """
    from mobillama.tokenizer.core import Tokenizer  # core imports this module

    if isinstance(tokenizer, Tokenizer):
        return tokenizer.conventions
    hf = getattr(tokenizer, "hf", tokenizer)
    try:
        return _HF_CONVENTIONS[hf]
    except (KeyError, TypeError):
        pass
    directory = Path(str(getattr(hf, "name_or_path", "") or ""))
    add_bos, extra = None, ()
    if str(directory) not in ("", ".") and directory.is_dir():
        add_bos = read_add_bos_token(directory)
        extra = read_generation_stop_ids(directory)
    result = derive_conventions(hf, add_bos, extra)
    with contextlib.suppress(TypeError):  # not weak-referenceable: computed again next time
        _HF_CONVENTIONS[hf] = result
    return result


def bos_prefix(tokenizer: Any, text: str) -> list[int]:
    """``[bos_id]`` when a prompt or document ``text`` needs BOS in front by the tokenizer's rule, else ``[]``.

    BOS is added only where the tokenizer adds it to plain text, and never to text that already starts
    with the BOS token (a chat template that writes ``bos_token`` itself), so there is never a second one.
    """
    c = conventions(tokenizer)
    if not c.add_bos or c.bos_id is None or (c.bos_token and text.startswith(c.bos_token)):
        return []
    return [c.bos_id]


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Prompt ids for any tokenizer the project handles, BOS by the tokenizer's own rule.

    A :class:`Tokenizer` (or a test double with ``encode_prompt``) encodes it itself; a transformers
    tokenizer encodes without its post-processor and gets :func:`bos_prefix`.
    """
    own = getattr(tokenizer, "encode_prompt", None)
    if own is not None:
        return own(text)
    if hasattr(tokenizer, "added_tokens_decoder"):  # a transformers tokenizer
        return bos_prefix(tokenizer, text) + list(tokenizer.encode(text, add_special_tokens=False))
    return tokenizer.encode(text, add_bos=True)  # a minimal double: the Llama convention


def stop_ids(tokenizer: Any) -> tuple[int, ...]:
    """The ids that end generation for any tokenizer (a double without ``stop_ids``: its EOS)."""
    own = getattr(tokenizer, "stop_ids", None)
    if own is not None:
        return tuple(own)
    if hasattr(tokenizer, "added_tokens_decoder"):
        return conventions(tokenizer).stop_ids
    eos = getattr(tokenizer, "eos_id", None)
    return () if eos is None else (eos,)


def read_add_bos_token(directory: str | Path) -> bool | None:
    """tokenizer_config.json's ``add_bos_token`` in ``directory`` (None when absent or not a boolean)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("add_bos_token")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise MobiLlamaError(f"{path}: not a valid JSON object ({e})") from None
    return value if isinstance(value, bool) else None


def read_generation_stop_ids(directory: str | Path) -> tuple[int, ...]:
    """The ``eos_token_id`` (an id or a list of ids) of ``directory``'s generation_config.json, if any."""
    path = Path(directory) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return ()
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise MobiLlamaError(f"{path}: not a valid JSON object ({e})") from None
    values = value if isinstance(value, list) else [value]
    return tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool))
