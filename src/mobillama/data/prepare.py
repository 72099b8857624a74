"""``mobillama data prepare``: text sources → packed, shuffled, hashed token shards with a manifest.

The pipeline, and why each step is the way it is:

1. **Resolve and hash sources** (:mod:`mobillama.data.sources`): every input file's size and sha256 go in
   the manifest, so a shard directory names exactly what it was built from.
2. **Tokenize** in document order (:mod:`mobillama.data.tokenize`). Batches of ~1 MB of text go to
   ``workers`` processes; results are taken back in submission order, so the token stream does not depend
   on the worker count. At most ``2 × workers`` batches are in flight, so memory stays flat however large
   the corpus. Tokens go to a temporary file inside the (temporary) output directory, never to RAM.
3. **Split by document**: a seeded permutation of the document list; its first ``val_fraction`` of
   documents form the validation split, the rest train. A document is never cut between splits.
4. **Pack**: each split's documents, in that shuffled order, are written as ``<s> tokens </s>`` one
   after the other (the tokenizer's conventions decide: BOS in front only where the tokenizer adds BOS to
   text, and the separator after each document is ``<|endoftext|>`` where the vocabulary has it as a
   special token, else EOS; a SmolLM2-style tokenizer gives ``tokens <|endoftext|>``) and cut into rows of ``seq_len + 1`` tokens (Amber's 2049 layout: inputs are
   ``row[:-1]``, targets ``row[1:]``). The incomplete last row is dropped (counted in the manifest).
   Train rows are divided into ``chunks`` shards of near-equal size (Amber used 360); val is one shard.
   Each shard is a raw little-endian uint16 (vocab ≤ 65536) or uint32 array; its sha256 is computed while
   writing. A ``{split}-docs.npy`` index maps every token range back to its source file and document.
5. **Manifest** (``manifest.json``, documented field by field in docs/data.md) and a copy of the tokenizer
   (``tokenizer/``) are written, and the temporary directory is renamed into place only now
   (:func:`~mobillama.checkpoint.atomic_directory`): a failure leaves no half-written output.

Nothing in the output depends on the clock, the machine's core count or the worker count: the same
inputs, tokenizer and seed give byte-identical files (manifest included).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from mobillama import __version__
from mobillama.checkpoint import atomic_directory, sha256_file, write_json
from mobillama.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, TOKENIZER_SUBDIR, shard_dtype
from mobillama.data.sources import DEFAULT_MAX_DOC_BYTES, SkipLog, Source, resolve_sources
from mobillama.data.tokenize import default_workers, tokenize_sources
from mobillama.errors import MobiLlamaError
from mobillama.tokenizer import END_OF_TEXT, Tokenizer, load_tokenizer

TOKENS_TMP = ".tokens.tmp"
DOC_INDEX_COLUMNS = ("source_id", "locator", "start", "length")


# ---- splitting and packing ------------------------------------------------------------------------------------
def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) document indices: a seeded permutation; val takes its first round(n·fraction) docs."""
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(n_docs)
    n_val = 0 if val_fraction <= 0 else max(1, round(n_docs * val_fraction))
    if n_val >= n_docs:
        raise MobiLlamaError(
            f"--val-fraction {val_fraction} leaves no training documents ({n_docs} usable document(s)); "
            "add text or lower --val-fraction (0 disables the validation split)"
        )
    return perm[n_val:], perm[:n_val]


class _ShardWriter:
    """Writes a split's token stream into consecutive shard files, hashing as it goes."""

    def __init__(self, directory: Path, split: str, sizes: list[int], sample_len: int, dtype: np.dtype):
        self.directory, self.split, self.sample_len, self.dtype = directory, split, sample_len, dtype
        self.sizes = sizes
        self.shards: list[dict] = []
        self._index = -1
        self._file = None
        self._hash = None
        self._room = 0
        self._samples_before = 0
        self._open_next()

    @property
    def done(self) -> bool:
        return self._file is None

    def _open_next(self) -> None:
        self._index += 1
        if self._index >= len(self.sizes):
            self._file = None
            return
        name = f"{self.split}-{self._index:05d}.bin"
        self._file = open(self.directory / name, "wb", buffering=1 << 20)  # noqa: SIM115 (closed in _close)
        self._hash = hashlib.sha256()
        self._room = self.sizes[self._index] * self.sample_len
        self.shards.append(
            {
                "path": name,
                "num_samples": self.sizes[self._index],
                "sample_offset": self._samples_before,
                "sha256": None,
                "bytes": self._room * self.dtype.itemsize,
            }
        )
        self._samples_before += self.sizes[self._index]

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size and self._file is not None:
            part = tokens[: self._room]
            data = part.astype(self.dtype, copy=False).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._room -= part.size
            tokens = tokens[part.size :]
            if self._room == 0:
                self._file.close()
                self.shards[-1]["sha256"] = self._hash.hexdigest()
                self._open_next()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def pack_split(
    name: str,
    doc_ids: np.ndarray,
    table: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    tokens: BinaryIO,
    directory: Path,
    *,
    seq_len: int,
    n_shards: int,
    dtype: np.dtype,
    bos_id: int | None,
    separator_id: int,
) -> dict:
    """Write one split's shards and document index; return its manifest entry.

    ``tokens`` is the temporary token file (all documents, in reading order) opened for reading. Each
    document is written as ``[bos_id] tokens separator_id`` (no BOS when ``bos_id`` is None).
    """
    source_ids, locators, lengths, offsets = table
    sample_len = seq_len + 1
    doc_lengths = lengths[doc_ids] + (bos_id is not None) + 1  # [<s>] ... separator
    total = int(doc_lengths.sum())
    n_samples = total // sample_len
    if n_samples == 0:
        hint = "raise --val-fraction" if name == "val" else "add text"
        raise MobiLlamaError(
            f"the {name} split has {total} tokens, fewer than one sample of {sample_len} (--seq-len + 1); "
            f"lower --seq-len or {hint}"
        )
    if n_shards > n_samples:
        raise MobiLlamaError(
            f"--chunks {n_shards} is more than the {n_samples} {name} samples; lower --chunks"
        )
    sizes = [n_samples // n_shards + (i < n_samples % n_shards) for i in range(n_shards)]
    starts = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]]).astype(np.int64)
    index = np.stack([source_ids[doc_ids], locators[doc_ids], starts, doc_lengths], axis=1).astype("<i8")
    index_name = f"{name}-docs.npy"
    np.save(directory / index_name, index, allow_pickle=False)

    writer = _ShardWriter(directory, name, sizes, sample_len, dtype)
    bos = np.array([] if bos_id is None else [bos_id], dtype)
    eos = np.array([separator_id], dtype)
    try:
        for d in doc_ids.tolist():
            if writer.done:
                break
            # explicit reads, not a memmap: mapped pages would count in RSS and grow with the corpus
            tokens.seek(int(offsets[d]) * dtype.itemsize)
            body = np.fromfile(tokens, dtype=dtype, count=int(lengths[d]))
            writer.write(np.concatenate([bos, body, eos]))
    finally:
        writer.close()
    return {
        "shards": writer.shards,
        "num_samples": n_samples,
        "num_tokens": n_samples * sample_len,
        "num_documents": len(doc_ids),
        "document_tokens": total,
        "dropped_tokens": total - n_samples * sample_len,
        "doc_index": {
            "path": index_name,
            "sha256": sha256_file(directory / index_name),
            "columns": list(DOC_INDEX_COLUMNS),
        },
    }


# ---- the command -----------------------------------------------------------------------------------------------
def _check_options(seq_len: int, val_fraction: float, chunks: int, workers: int, max_doc_bytes: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise MobiLlamaError(f"--seq-len must be a positive integer, got {seq_len!r}")
    if not 0 <= val_fraction < 1:
        raise MobiLlamaError(f"--val-fraction must be in [0, 1), got {val_fraction!r}")
    if not isinstance(chunks, int) or chunks < 1:
        raise MobiLlamaError(f"--chunks must be a positive integer, got {chunks!r}")
    if not isinstance(workers, int) or workers < 1:
        raise MobiLlamaError(f"--workers must be a positive integer, got {workers!r}")
    if max_doc_bytes < 1:
        raise MobiLlamaError(f"the maximum document size must be positive, got {max_doc_bytes!r}")


def describe_sources(sources: Sequence[Source], progress: bool) -> list[dict]:
    """Size and sha256 of every source file (the manifest's record of what went in)."""
    out = []
    for sid, source in enumerate(tqdm(sources, desc="hashing sources", unit="file", disable=not progress)):
        out.append(
            {
                "id": sid,
                **source.describe(),
                "size": source.path.stat().st_size,
                "sha256": sha256_file(source.path),
            }
        )
    return out


def prepare_corpus(
    inputs: Sequence[str | Path] = (),
    tokenizer: str | Path | Tokenizer | None = None,
    out_dir: str | Path | None = None,
    *,
    source: str | None = None,
    seq_len: int = 2048,
    val_fraction: float = 0.01,
    chunks: int = 1,
    workers: int | None = None,
    text_field: str = "text",
    split: str = "train",
    seed: int = 0,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Build a token-shard directory at ``out_dir`` from text inputs; return its manifest.

    See the module docstring for the steps and docs/data.md for the output format.
    """
    if not tokenizer or not out_dir:
        raise MobiLlamaError("prepare_corpus needs a tokenizer and an output directory")
    workers = default_workers() if workers is None else workers
    _check_options(seq_len, val_fraction, chunks, workers, max_doc_bytes)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if tok.conventions.end_of_text_id is None:
        raise MobiLlamaError(
            f"tokenizer {tok.origin}: needs an EOS (or {END_OF_TEXT}) token to separate documents"
        )
    dtype = shard_dtype(tok.vocab_size)
    sources = resolve_sources(inputs, source=source, text_field=text_field, split=split)
    out_dir = Path(out_dir)

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        source_info = describe_sources(sources, progress)
        skips = SkipLog(strict=strict)
        tokens_path = tmp / TOKENS_TMP
        table, stats = tokenize_sources(
            sources,
            tok,
            tokens_path,
            dtype,
            workers=workers,
            skips=skips,
            max_doc_bytes=max_doc_bytes,
            progress=progress,
        )
        arrays = table.arrays()
        n_docs = len(arrays[2])
        if n_docs == 0:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(skips.by_reason.items())) or "no documents"
            raise MobiLlamaError(f"no usable documents in the input ({reasons})")
        train_docs, val_docs = split_documents(n_docs, val_fraction, seed)
        layout = document_layout(tok)
        common = {"seq_len": seq_len, "dtype": dtype, **layout}
        with open(tokens_path, "rb") as tokens:
            splits = {
                "train": pack_split("train", train_docs, arrays, tokens, tmp, n_shards=chunks, **common)
            }
            if len(val_docs):
                splits["val"] = pack_split("val", val_docs, arrays, tokens, tmp, n_shards=1, **common)
        tokens_path.unlink()
        (tmp / TOKENIZER_SUBDIR).mkdir()
        tok.save_files(tmp / TOKENIZER_SUBDIR)

        for info, counts in zip(source_info, stats):
            info["documents"] = counts["documents"]
            info["tokens"] = counts["tokens"]
            info["text_bytes"] = counts["text_bytes"]
            info["skipped"] = dict(sorted(skips.by_source.get(info["id"], Counter()).items()))
        manifest = build_manifest(
            tok, dtype, source_info, splits, skips,
            inputs=[str(i) for i in inputs], source=source, seq_len=seq_len, seed=seed,
            val_fraction=val_fraction, chunks=chunks, max_doc_bytes=max_doc_bytes,
        )  # fmt: skip
        write_json(tmp / MANIFEST, manifest)
    return manifest


def document_layout(tok: Tokenizer) -> dict[str, int | None]:
    """How documents are framed in the shards, by the tokenizer's conventions: ``bos_id`` in front (None
    where the tokenizer adds no BOS to text) and ``separator_id`` after (``<|endoftext|>`` or EOS)."""
    if tok.add_bos and tok.bos_id is None:
        raise MobiLlamaError(f"tokenizer {tok.origin}: adds BOS to text but has no BOS token")
    return {"bos_id": tok.bos_id if tok.add_bos else None, "separator_id": tok.end_of_text_id}


def _layout_text(tok: Tokenizer) -> str:
    layout = document_layout(tok)
    name = tok.hf.convert_ids_to_tokens
    head = f"{name(layout['bos_id'])} " if layout["bos_id"] is not None else ""
    return (
        f"{head}document tokens {name(layout['separator_id'])}, concatenated and cut into rows of sample_len"
    )


def build_manifest(
    tok: Tokenizer,
    dtype: np.dtype,
    sources: list[dict],
    splits: dict,
    skips: SkipLog,
    **settings: Any,
) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"mobillama {__version__}",
        "seq_len": settings["seq_len"],
        "sample_len": settings["seq_len"] + 1,
        "dtype": dtype.name,
        "byte_order": "little",
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "add_bos": tok.add_bos,
        "separator_id": tok.end_of_text_id,
        "tokenizer_sha256": tok.sha256,
        "tokenizer": {"origin": tok.origin, "dir": TOKENIZER_SUBDIR},
        "document_layout": _layout_text(tok),
        "seed": settings["seed"],
        "val_fraction": settings["val_fraction"],
        "chunks": settings["chunks"],
        "max_doc_bytes": settings["max_doc_bytes"],
        "inputs": settings["inputs"],
        "source": settings["source"],
        "documents": {
            "used": sum(s["documents"] for s in sources),
            "skipped": skips.total,
            **{name: split["num_documents"] for name, split in splits.items()},
        },
        "tokens": {
            "documents": sum(s["tokens"] for s in sources),
            **{name: split["num_tokens"] for name, split in splits.items()},
        },
        "skipped": {
            "total": skips.total,
            "by_reason": dict(sorted(skips.by_reason.items())),
            "examples": skips.examples,
        },
        "sources": sources,
        "splits": splits,
    }
