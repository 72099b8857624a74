"""Step 2 of ``mobillama data prepare``: documents → one stream of token ids on disk, in document order.

Batches of ~1 MB of text go to ``workers`` processes and their results are taken back in submission order,
so the token stream never depends on the worker count; at most ``2 × workers`` batches are in flight, so
memory stays flat however large the corpus. It is its own module because it is the one part of preparing
data that runs in parallel processes (the per-process encoder state lives here), while
:mod:`mobillama.data.prepare` splits, packs and describes what this writes.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
from array import array
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mobillama.data.sources import SkipLog, Source, iter_documents
from mobillama.tokenizer import Tokenizer, plain_text_backend

BATCH_BYTES = 1 << 20


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# ---- tokenization ------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_encoder(tokenizer_json: str, dtype: str) -> None:
    """Per-process setup: a plain-text encoder, single-threaded (the processes are the parallelism)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["backend"] = plain_text_backend(tokenizer_json)
    _WORKER["dtype"] = np.dtype(dtype)


def _encode_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch; returns (all ids concatenated, per-document lengths) as compact arrays."""
    ids = [e.ids for e in _WORKER["backend"].encode_batch(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=_WORKER["dtype"], count=int(lengths.sum()))
    return flat, lengths


@contextlib.contextmanager
def _single_threaded_tokenizers() -> Iterator[None]:
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def encode_stream(
    batches: Iterator[tuple[Any, list[str]]], tokenizer_json: str, dtype: np.dtype, workers: int
) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
    """Encode ``(meta, texts)`` batches in order with ``workers`` processes (1: in this process)."""
    if workers == 1:
        saved = dict(_WORKER)
        with _single_threaded_tokenizers():
            _init_encoder(tokenizer_json, dtype.str)
            try:
                for meta, texts in batches:
                    yield (meta, *_encode_texts(texts))
            finally:
                _WORKER.clear()
                _WORKER.update(saved)
        return
    # fork shares the already-imported modules (spawn would re-import torch/transformers per worker)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers, initializer=_init_encoder, initargs=(tokenizer_json, dtype.str))
    try:
        pending: deque = deque()
        for meta, texts in batches:
            pending.append((meta, pool.apply_async(_encode_texts, (texts,))))
            while len(pending) >= 2 * workers:  # bounded read-ahead: memory stays flat
                meta_done, result = pending.popleft()
                yield (meta_done, *result.get())
        while pending:
            meta_done, result = pending.popleft()
            yield (meta_done, *result.get())
        pool.close()
    finally:
        pool.terminate()
        pool.join()


@dataclass
class DocumentTable:
    """Where each tokenized document lives in the temporary token file, and where it came from."""

    source_ids: array = field(default_factory=lambda: array("q"))
    locators: array = field(default_factory=lambda: array("q"))
    lengths: array = field(default_factory=lambda: array("q"))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(source ids, locators, lengths, offsets into the token file) as int64 arrays."""
        source_ids, locators, lengths = (
            np.frombuffer(a, dtype=np.int64) if len(a) else np.zeros(0, np.int64)
            for a in (self.source_ids, self.locators, self.lengths)
        )
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
        return source_ids, locators, lengths, offsets


def _batches(
    sources: Sequence[Source], skips: SkipLog, max_doc_bytes: int, stats: list[Counter]
) -> Iterator[tuple[list[tuple[int, int, int]], list[str]]]:
    """Group documents into ~1 MB batches: ((source_id, locator, n_bytes) per doc, texts)."""
    meta, texts, size = [], [], 0
    for sid, source in enumerate(sources):
        for locator, text in iter_documents(source, sid, skips, max_doc_bytes=max_doc_bytes):
            n_bytes = len(text.encode("utf-8"))
            meta.append((sid, locator, n_bytes))
            texts.append(text)
            size += n_bytes
            if size >= BATCH_BYTES:
                yield meta, texts
                meta, texts, size = [], [], 0
    if texts:
        yield meta, texts


def tokenize_sources(
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    tokens_path: Path,
    dtype: np.dtype,
    *,
    workers: int,
    skips: SkipLog,
    max_doc_bytes: int,
    progress: bool,
) -> tuple[DocumentTable, list[Counter]]:
    """Tokenize every document into ``tokens_path``; return the document table and per-source counts."""
    table = DocumentTable()
    stats = [Counter() for _ in sources]
    n_docs = n_tokens = 0
    tokenizer_json = tokenizer.hf.backend_tokenizer.to_str()
    batches = _batches(sources, skips, max_doc_bytes, stats)
    with (
        open(tokens_path, "wb", buffering=1 << 20) as out,
        tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=not progress, dynamic_ncols=True) as bar,
    ):
        for meta, flat, lengths in encode_stream(batches, tokenizer_json, dtype, workers):
            out.write(flat.tobytes())
            batch_bytes = 0
            for (sid, locator, n_bytes), n in zip(meta, lengths.tolist()):
                table.source_ids.append(sid)
                table.locators.append(locator)
                table.lengths.append(n)
                stats[sid]["documents"] += 1
                stats[sid]["tokens"] += n
                stats[sid]["text_bytes"] += n_bytes
                batch_bytes += n_bytes
            n_docs += len(meta)
            n_tokens += int(flat.size)
            bar.update(batch_bytes)
            bar.set_postfix(docs=n_docs, tokens=n_tokens, skipped=skips.total, refresh=False)
    return table, stats
