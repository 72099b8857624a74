"""Tokenizers: train, load and save one kind of object, with the chat template in one place.

Every tokenizer the project touches ends up as a Hugging Face ``tokenizers`` model wrapped in a
``PreTrainedTokenizerFast`` (:attr:`Tokenizer.hf`), whatever it was loaded from:

* a Llama-2-format SentencePiece ``tokenizer.model`` (converted here, see :func:`sentencepiece_to_hf`),
* an HF ``tokenizer.json`` file or a directory holding one (any HF tokenizer directory),
* a directory written by :meth:`Tokenizer.save` (which is also such an HF directory).

Why HF ``tokenizers`` rather than ``sentencepiece`` for training: its ``tokenizer.json`` is what
``transformers.AutoTokenizer`` (and so lm-eval, peft, pipelines and the server) load directly, the same
object encodes in batches from Rust, and one runtime serves trained and converted tokenizers alike.
A SentencePiece model would need a conversion step on every load and a second code path for encoding.

Conventions of the tokenizers trained here (Llama's): ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2, then the 256
byte-fallback pieces ``<0x00>``..``<0xFF>``, so any byte sequence is encodable and decoding is lossless. Text is
normalised the SentencePiece way: a ``▁`` is prepended and every space becomes ``▁``.

Imported tokenizers keep their own special-token conventions, read from their files (never guessed from a model
name), see :class:`Conventions`: whether plain text gets BOS (SmolLM2's ChatML tokenizer: no), which token separates
documents (``<|endoftext|>`` in the GPT-2 family, else EOS) and which tokens end generation (EOS plus the chat
template's end-of-turn token, such as ``<|im_end|>``, plus the checkpoint's ``generation_config.json`` ids).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mobillama.errors import MobiLlamaError

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
SPIECE_UNDERLINE = "▁"
METADATA_FILE = "mobillama_tokenizer.json"
SP_MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# The GPT-2 family's document separator (SmolLM2, Qwen, ...): used between documents when it is a special token.
END_OF_TEXT = "<|endoftext|>"
# End-of-turn tokens of common chat templates (ChatML, Llama-3, Gemma, Phi-3): generation stops at any of them
# that the vocabulary holds as a special token, besides EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")

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

# Pre-tokenization for training: split the normalised text into words that keep their leading "▁",
# runs of spaces (indentation) as one piece, newlines on their own, and single digits (Llama splits digits).
_WORD_SPLIT = r"\n+|▁+(?=▁)|▁?[^▁\n]+|▁+"


class Tokenizer:
    """One interface over any tokenizer the project loads; the wrapped HF object is :attr:`hf`."""

    def __init__(
        self,
        hf: Any,
        *,
        origin: str = "",
        sp_model: bytes | None = None,
        add_bos_token: bool | None = None,
        extra_stop_ids: Sequence[int] = (),
    ) -> None:
        """``add_bos_token`` is tokenizer_config.json's field when the files have one (else the post-processor
        decides, see :func:`derive_conventions`); ``extra_stop_ids`` come from a checkpoint's
        generation_config.json."""
        self.hf = hf
        self.origin = origin
        self._sp_model = sp_model  # the original tokenizer.model bytes, kept so save() can copy it
        self._backend = hf.backend_tokenizer
        self._plain_backend: Any = None  # a copy that reads special-token text as plain text (lazy)
        self._add_bos_token = add_bos_token  # kept so save() writes it back (transformers drops it)
        if hf.chat_template is None:
            hf.chat_template = MOBILLAMA_CHAT_TEMPLATE
        if hf.pad_token is None and hf.unk_token is not None:
            hf.pad_token = hf.unk_token  # Llama has no pad token; <unk> (id 0) is never a real target
        self.conventions = derive_conventions(hf, add_bos_token, extra_stop_ids)

    # ---- ids -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids (model vocabulary plus added tokens): the model's embedding must be this large."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def pad_id(self) -> int | None:
        return self.hf.pad_token_id

    @property
    def unk_id(self) -> int | None:
        return self.hf.unk_token_id

    @property
    def bos_token(self) -> str | None:
        return self.hf.bos_token

    @property
    def add_bos(self) -> bool:
        """Whether this tokenizer puts BOS in front of plain text (its own convention, from its files)."""
        return self.conventions.add_bos

    @property
    def end_of_text_id(self) -> int:
        """The document separator for corpus preparation: ``<|endoftext|>`` where special, else EOS."""
        return self._require(self.conventions.end_of_text_id, "end-of-text or EOS")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: EOS, the chat template's end-of-turn token, generation_config's ids."""
        return self.conventions.stop_ids

    # ---- encode / decode -------------------------------------------------------------------------
    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [self._require(self.bos_id, "BOS"), *ids]
        if add_eos:
            ids = [*ids, self._require(self.eos_id, "EOS")]
        return ids

    def _require(self, token_id: int | None, name: str) -> int:
        if token_id is None:
            raise MobiLlamaError(f"tokenizer {self.origin or '(in memory)'} has no {name} token")
        return token_id

    def _encoder(self, parse_special: bool) -> Any:
        if parse_special:
            return self._backend
        if self._plain_backend is None:
            self._plain_backend = plain_text_backend(self._backend.to_str())
        return self._plain_backend

    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, *, parse_special: bool = True
    ) -> list[int]:
        """Token ids of ``text``.

        With ``parse_special`` (the default, right for prompts and chat templates) special tokens written
        in the text, such as ``</s>``, become their ids. Corpus preparation passes ``parse_special=False``:
        raw documents are plain text, so a literal ``</s>`` in a web page or source file stays characters
        (this is also what SentencePiece itself does).
        """
        ids = self._encoder(parse_special).encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(
        self,
        texts: Sequence[str],
        add_bos: bool = False,
        add_eos: bool = False,
        *,
        parse_special: bool = True,
    ) -> list[list[int]]:
        """Encode many texts in one call into the Rust library (faster than a Python loop)."""
        encodings = self._encoder(parse_special).encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt (plain text or a rendered chat template), BOS by the tokenizer's rule.

        BOS goes first only where this tokenizer adds it to plain text (:attr:`add_bos`) and the text does
        not already start with it (a chat template that writes ``bos_token`` itself): never twice.
        """
        return self._wrap(self.encode(text), bool(bos_prefix(self, text)), False)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat --------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str:
        return self.hf.chat_template

    @property
    def uses_mobillama_chat(self) -> bool:
        """Whether the template is MobiLlama-Chat's (whose replies end at a "### Human:" stop string)."""
        return is_mobillama_template(self.chat_template)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation as prompt text with the tokenizer's template (MobiLlama-Chat by default)."""
        check_messages(messages)
        return render_template(self.hf, list(messages), add_generation_prompt=add_generation_prompt)

    # ---- identity and files ----------------------------------------------------------------------
    @property
    def sha256(self) -> str:
        """Hash of the canonical ``tokenizer.json`` text: identifies the id mapping whatever the source."""
        return hashlib.sha256(self._backend.to_str().encode("utf-8")).hexdigest()

    def save(self, out_dir: str | Path, *, overwrite: bool = False, metadata: dict | None = None) -> Path:
        """Write an HF tokenizer directory (atomically) that both AutoTokenizer and load_tokenizer read."""
        from mobillama.checkpoint import atomic_directory

        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            self.save_files(tmp, metadata=metadata)
        return Path(out_dir)

    def save_files(self, directory: str | Path, *, metadata: dict | None = None) -> None:
        """Write the tokenizer files into an existing directory (a checkpoint being assembled, say)."""
        from mobillama.checkpoint import write_json

        directory = Path(directory)
        # save_jinja_files=False keeps the chat template inside tokenizer_config.json
        self.hf.save_pretrained(str(directory), save_jinja_files=False)
        if self._add_bos_token is not None:  # transformers does not write it back; it decides add_bos
            config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
            write_json(directory / CONFIG_FILE, {**config, "add_bos_token": self._add_bos_token})
        if self._sp_model is not None:
            (directory / SP_MODEL_FILE).write_bytes(self._sp_model)
        from mobillama import __version__

        write_json(
            directory / METADATA_FILE,
            {
                "sha256": self.sha256,
                "vocab_size": self.vocab_size,
                "bos_id": self.bos_id,
                "eos_id": self.eos_id,
                "pad_id": self.pad_id,
                "origin": self.origin,
                "mobillama_version": __version__,
                **(metadata or {}),
            },
        )

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, origin={self.origin!r}, sha256={self.sha256[:12]})"


def plain_text_backend(tokenizer_json: str) -> Any:
    """A ``tokenizers.Tokenizer`` that reads special-token strings in text as ordinary characters."""
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(tokenizer_json)
    backend.encode_special_tokens = True
    return backend


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


# ---- building HF objects ---------------------------------------------------------------------------
def _wrap_backend(backend: Any, **special: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = {k: v for k, v in {"unk_token": UNK, "bos_token": BOS, "eos_token": EOS}.items() if v in vocab}
    tokens.update(special)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **tokens)
    return hf


def _llama_pipeline(backend: Any, *, add_dummy_prefix: bool = True) -> None:
    """Llama's normaliser, decoder and BOS post-processor (the layout of Llama-2's tokenizer.json)."""
    from tokenizers import decoders, normalizers

    steps = [normalizers.Prepend(SPIECE_UNDERLINE)] if add_dummy_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPIECE_UNDERLINE)])
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace(SPIECE_UNDERLINE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            *([decoders.Strip(" ", 1, 0)] if add_dummy_prefix else []),
        ]
    )
    _bos_post_processor(backend)


def _bos_post_processor(backend: Any) -> None:
    """AutoTokenizer users get Llama's ``<s> text`` with ``add_special_tokens=True``."""
    from tokenizers import processors

    bos_id = backend.token_to_id(BOS)
    if bos_id is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
        )


def sentencepiece_to_hf(model_bytes: bytes, origin: str) -> Any:
    """Convert a SentencePiece BPE ``tokenizer.model`` (Llama-2 format) to an HF fast tokenizer.

    Written here rather than through transformers' converter because transformers 5 orders the BPE merges
    by piece id, not by piece score; SentencePiece merges by score, so for models whose whitespace pieces
    have low scores (``▁▁`` at -1e9 in the Mistral/Llama family) the converted tokenizer splits runs of
    spaces differently from SentencePiece itself. Ordering merges by score reproduces SentencePiece.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # pragma: no cover - sentencepiece is a dependency
        raise MobiLlamaError(f"reading {origin} needs sentencepiece and protobuf installed ({e})") from None
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(model_bytes)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise MobiLlamaError(f"{origin}: not a SentencePiece model ({type(e).__name__})") from None
    if not proto.pieces:
        raise MobiLlamaError(f"{origin}: not a SentencePiece model (no pieces)")
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise MobiLlamaError(f"{origin}: only BPE SentencePiece models (Llama format) are supported")
    if proto.normalizer_spec.precompiled_charsmap or proto.normalizer_spec.remove_extra_whitespaces:
        raise MobiLlamaError(
            f"{origin}: SentencePiece normalisation rules are not supported (Llama-format models use none)"
        )
    piece_type = pb.ModelProto.SentencePiece.Type
    normal, special, user = (
        piece_type.NORMAL,
        (piece_type.UNKNOWN, piece_type.CONTROL),
        piece_type.USER_DEFINED,
    )
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal_ids = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == normal}
    # SentencePiece BPE repeatedly merges the adjacent pair whose merged piece has the highest score;
    # an HF BPE merge list ranked by that score (ties by the parts' ids) does the same.
    ranked = []
    for piece, pid in normal_ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal_ids and right in normal_ids:
                ranked.append(
                    (-proto.pieces[pid].score, pid, normal_ids[left], normal_ids[right], left, right)
                )
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk_piece = proto.pieces[proto.trainer_spec.unk_id].piece
    backend = Backend(
        BPE(
            vocab=vocab,
            merges=merges,
            unk_token=unk_piece,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
        )
    )
    backend.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces if p.type in special]
    )
    backend.add_tokens([AddedToken(p.piece, normalized=False) for p in proto.pieces if p.type == user])
    _llama_pipeline(backend, add_dummy_prefix=proto.normalizer_spec.add_dummy_prefix)
    return _wrap_backend(
        backend,
        unk_token=unk_piece,
        **({"bos_token": proto.trainer_spec.bos_piece} if proto.trainer_spec.bos_id >= 0 else {}),
        **({"eos_token": proto.trainer_spec.eos_piece} if proto.trainer_spec.eos_id >= 0 else {}),
    )


# ---- loading ----------------------------------------------------------------------------------------
def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a ``tokenizer.model``, a ``tokenizer.json``, or a directory holding either."""
    path = Path(path)
    if not path.exists():
        raise MobiLlamaError(f"tokenizer not found: {path}")
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _load_hf_dir(path)
        if (path / SP_MODEL_FILE).is_file():
            return _load_sp_file(path / SP_MODEL_FILE, **_conventions_from_dir(path))
        raise MobiLlamaError(f"{path}: no tokenizer.json or {SP_MODEL_FILE} in this directory")
    if path.suffix == ".json":
        return _load_json_file(path)
    return _load_sp_file(path)


def _load_sp_file(path: Path, **conventions: Any) -> Tokenizer:
    data = path.read_bytes()
    hf = sentencepiece_to_hf(data, str(path))
    return Tokenizer(hf, origin=str(path), sp_model=data, **conventions)


def _read_backend(path: Path) -> Any:
    from tokenizers import Tokenizer as Backend

    try:
        return Backend.from_file(str(path))
    except Exception as e:  # the Rust side raises a generic Exception for malformed JSON
        raise MobiLlamaError(
            f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0][:160]})"
        ) from None


def _load_json_file(path: Path) -> Tokenizer:
    return Tokenizer(_wrap_backend(_read_backend(path)), origin=str(path))


def _conventions_from_dir(path: Path) -> dict:
    """Constructor arguments that a directory's config files decide (see :func:`derive_conventions`)."""
    return {
        "add_bos_token": read_add_bos_token(path),
        "extra_stop_ids": read_generation_stop_ids(path),
    }


def _load_hf_dir(path: Path) -> Tokenizer:
    from transformers import PreTrainedTokenizerFast

    _read_backend(path / "tokenizer.json")  # a clear error for a corrupt file before transformers' own
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        try:
            json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MobiLlamaError(f"{config_file}: not valid JSON ({e})") from None
    try:
        hf = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise MobiLlamaError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0][:160]})") from None
    if hf.bos_token is None and hf.eos_token is None:  # a bare tokenizer.json: use Llama's names if present
        vocab = hf.get_vocab()
        for attr, tok in (("unk_token", UNK), ("bos_token", BOS), ("eos_token", EOS)):
            if tok in vocab:
                setattr(hf, attr, tok)
    sp_file = path / SP_MODEL_FILE
    return Tokenizer(
        hf,
        origin=str(path),
        sp_model=sp_file.read_bytes() if sp_file.is_file() else None,
        **_conventions_from_dir(path),
    )


# ---- training -----------------------------------------------------------------------------------------
def new_bpe_backend() -> Any:
    """An untrained byte-fallback BPE with Llama's special tokens, normaliser and pre-tokenizer."""
    from tokenizers import Regex, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    backend = Backend(BPE(unk_token=UNK, fuse_unk=True, byte_fallback=True))
    _llama_pipeline(backend)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_WORD_SPLIT), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    return backend


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path | None = None,
    *,
    min_frequency: int = 2,
    max_alphabet: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
    metadata: dict | None = None,
) -> Tokenizer:
    """Train a byte-fallback BPE tokenizer with Llama conventions on ``texts``; save it if ``out_dir``.

    ``texts`` is any iterable of documents (see :func:`mobillama.data.sources.iter_texts`). The vocabulary
    is ``<unk>, <s>, </s>``, the 256 byte pieces, up to ``max_alphabet`` single characters (the rest fall
    back to bytes) and merges up to ``vocab_size``. Training is deterministic for the same texts.
    """
    from tokenizers import trainers

    n_fixed = 3 + len(BYTE_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < n_fixed + 16:
        raise MobiLlamaError(
            f"--vocab-size {vocab_size} is too small: a byte-fallback tokenizer needs {n_fixed} fixed tokens "
            f"plus room for characters and merges (use at least {n_fixed + 16})"
        )
    if vocab_size > 1 << 20:
        raise MobiLlamaError(f"--vocab-size {vocab_size} is unreasonably large (at most {1 << 20})")
    backend = new_bpe_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[UNK, BOS, EOS, *BYTE_TOKENS],
        limit_alphabet=max(1, min(max_alphabet, (vocab_size - n_fixed) // 2)),
        show_progress=progress,
    )
    counted = _CountingIterator(texts)
    backend.train_from_iterator(counted, trainer=trainer)
    if counted.documents == 0:
        raise MobiLlamaError("no training text: every input was empty or skipped")
    # The byte pieces were registered as special tokens to pin their ids (3..258); make them ordinary
    # vocabulary entries again so a literal "<0x41>" in text is not read as one token.
    data = json.loads(backend.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in set(BYTE_TOKENS)]
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(json.dumps(data))
    _bos_post_processor(backend)  # BOS has an id only now
    tok = Tokenizer(_wrap_backend(backend), origin="trained")
    info = {
        "trained_on": {"documents": counted.documents, "characters": counted.characters},
        "vocab_size_requested": vocab_size,
        "min_frequency": min_frequency,
        **(metadata or {}),
    }
    if out_dir is not None:
        tok.save(out_dir, overwrite=overwrite, metadata={"training": info})
    return tok


class _CountingIterator(Iterator[str]):
    def __init__(self, texts: Iterable[str]) -> None:
        self._it = iter(texts)
        self.documents = 0
        self.characters = 0

    def __next__(self) -> str:
        text = next(self._it)
        self.documents += 1
        self.characters += len(text)
        return text
