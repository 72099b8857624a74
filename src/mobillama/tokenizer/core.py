"""The :class:`Tokenizer` wrapper: one interface (ids, encode/decode, chat, save) over any tokenizer loaded.

Whatever a tokenizer was loaded from, the project handles one object: a ``PreTrainedTokenizerFast``
(:attr:`Tokenizer.hf`) wrapped with the encode paths the project needs (special tokens parsed or read as plain
text, batches through the Rust library, prompts with BOS by the tokenizer's own rule), its special-token
conventions, its chat template, and a save that writes an HF directory both ``AutoTokenizer`` and
:func:`~mobillama.tokenizer.load_tokenizer` read. Loading, conversion and training live in their own modules
and all return this class.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mobillama.errors import MobiLlamaError
from mobillama.tokenizer.chat_template import (
    MOBILLAMA_CHAT_TEMPLATE,
    check_messages,
    is_mobillama_template,
    render_template,
)
from mobillama.tokenizer.llama_format import CONFIG_FILE, METADATA_FILE, SP_MODEL_FILE
from mobillama.tokenizer.special_tokens import bos_prefix, derive_conventions


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
