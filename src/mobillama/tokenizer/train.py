"""Training a byte-fallback BPE tokenizer with Llama's conventions on any iterable of documents.

Why HF ``tokenizers`` rather than ``sentencepiece`` for training: its ``tokenizer.json`` is what
``transformers.AutoTokenizer`` (and so lm-eval, peft, pipelines and the server) load directly, the same object
encodes in batches from Rust, and one runtime serves trained and converted tokenizers alike. The vocabulary
starts ``<unk>``, ``<s>``, ``</s>`` and the 256 byte pieces, so any byte sequence is encodable and decoding is
lossless; training is deterministic for the same texts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mobillama.errors import MobiLlamaError
from mobillama.tokenizer.core import Tokenizer
from mobillama.tokenizer.llama_format import (
    BOS,
    BYTE_TOKENS,
    EOS,
    UNK,
    _bos_post_processor,
    _llama_pipeline,
    _wrap_backend,
)

# Pre-tokenization for training: split the normalised text into words that keep their leading "▁",
# runs of spaces (indentation) as one piece, newlines on their own, and single digits (Llama splits digits).
_WORD_SPLIT = r"\n+|▁+(?=▁)|▁?[^▁\n]+|▁+"


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
