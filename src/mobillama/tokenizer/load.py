"""Loading a tokenizer from files: a ``tokenizer.model``, a ``tokenizer.json``, or a directory holding either.

One entry point, :func:`load_tokenizer`, decides what a path is and returns a
:class:`~mobillama.tokenizer.Tokenizer`, with a directory's tokenizer_config.json and generation_config.json
deciding its special-token conventions, and one-line errors for a missing, corrupt or unreadable file rather
than tracebacks from the Rust library or transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mobillama.errors import MobiLlamaError
from mobillama.tokenizer.core import Tokenizer
from mobillama.tokenizer.from_sentencepiece import sentencepiece_to_hf
from mobillama.tokenizer.llama_format import BOS, EOS, SP_MODEL_FILE, UNK, _wrap_backend
from mobillama.tokenizer.special_tokens import read_add_bos_token, read_generation_stop_ids


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
