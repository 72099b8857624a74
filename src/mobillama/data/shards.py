"""The token-shard format of ``mobillama data prepare`` and its one reader.

A shard directory is ``manifest.json`` (fields in docs/data.md, "Shard directory format") plus raw
little-endian uint16/uint32 files, one packed sample of ``seq_len + 1`` tokens per row (Amber's 2049
layout: inputs ``row[:-1]``, targets ``row[1:]``). The training loader, ``eval perplexity`` and
``data inspect/verify`` all read through :func:`open_split`, so they refuse the same things with the same
one-line errors: another format or version, a missing, truncated or modified shard (size, row count,
sha256), and token ids outside the manifest's vocabulary. Rows are memory-mapped, never loaded into RAM.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mobillama.checkpoint import read_json_object, sha256_file
from mobillama.errors import MobiLlamaError
from mobillama.tokenizer import load_tokenizer

FORMAT = "mobillama-token-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_SUBDIR = "tokenizer"
# the one table of shard dtypes: name in the manifest -> little-endian numpy dtype
SHARD_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
REQUIRED_KEYS = (
    "format_version",
    "seq_len",
    "sample_len",
    "dtype",
    "vocab_size",
    "bos_id",
    "eos_id",
    "splits",
)
_HASH_CHUNK = 1 << 22


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab ≤ 65536): half the disk and page cache of uint32."""
    return SHARD_DTYPES["uint16"] if vocab_size <= 1 << 16 else SHARD_DTYPES["uint32"]


def load_manifest(directory: str | Path) -> dict:
    """Read ``manifest.json`` of a shard directory and check its format, version and row layout."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MobiLlamaError(
            f"data directory not found: {directory} (create it with 'mobillama data prepare')"
        )
    path = directory / MANIFEST
    if not path.is_file():
        raise MobiLlamaError(
            f"{directory}: no {MANIFEST} (not a directory written by 'mobillama data prepare')"
        )
    manifest = read_json_object(path)
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise MobiLlamaError(f"{path}: missing key {missing[0]!r}")
    if manifest.get("format") != FORMAT or manifest["format_version"] != FORMAT_VERSION:
        raise MobiLlamaError(
            f"{path}: format {manifest.get('format')!r} version {manifest['format_version']!r} is not "
            f"{FORMAT!r} version {FORMAT_VERSION}"
        )
    if manifest["dtype"] not in SHARD_DTYPES:
        raise MobiLlamaError(f"{path}: dtype {manifest['dtype']!r} is not one of {', '.join(SHARD_DTYPES)}")
    if manifest["sample_len"] != manifest["seq_len"] + 1:
        raise MobiLlamaError(
            f"{path}: sample_len {manifest['sample_len']} is not seq_len + 1 ({manifest['seq_len']} + 1)"
        )
    return manifest


def split_entries(manifest: dict, split: str, directory: Path) -> list[dict]:
    """The shard entries of ``split``; an unknown split names the ones there are."""
    splits = manifest["splits"]
    if split not in splits:
        raise MobiLlamaError(f"{directory}: no {split!r} split (splits: {', '.join(splits) or 'none'})")
    return splits[split]["shards"]


def check_token_ids(
    rows: np.ndarray, vocab_size: int, where: str | Path, whose: str = "the manifest's"
) -> None:
    """Ids at or beyond ``vocab_size`` would index past the embedding: refuse them by name."""
    if rows.size and int(rows.max()) >= vocab_size:
        raise MobiLlamaError(f"{where}: token id {int(rows.max())} >= {whose} vocab_size {vocab_size}")


def _hash_and_max_id(path: Path, dtype: np.dtype) -> tuple[str, int]:
    """sha256 of the file and its largest token id, in one read."""
    h, top = hashlib.sha256(), -1
    with open(path, "rb") as f:
        while block := f.read(_HASH_CHUNK):
            h.update(block)
            top = max(top, int(np.frombuffer(block, dtype=dtype).max()))
    return h.hexdigest(), top


def check_shard(directory: Path, entry: dict, manifest: dict, *, verify_hash: bool) -> Path:
    """Existence, size and row count always; sha256 and the token-id range when ``verify_hash``."""
    path = directory / entry["path"]
    if not path.is_file():
        raise MobiLlamaError(f"{path}: shard listed in the manifest is missing")
    dtype = SHARD_DTYPES[manifest["dtype"]]
    row_bytes = manifest["sample_len"] * dtype.itemsize
    size = path.stat().st_size
    if size % row_bytes:
        raise MobiLlamaError(
            f"{path}: {size} bytes is not a whole number of {manifest['sample_len']}-token rows "
            "(truncated or modified shard)"
        )
    if size // row_bytes != entry["num_samples"]:
        raise MobiLlamaError(
            f"{path}: {size // row_bytes} rows, the manifest says {entry['num_samples']} "
            "(truncated or modified shard)"
        )
    if verify_hash:
        if not entry.get("sha256"):
            raise MobiLlamaError(f"{path}: the manifest records no sha256 for this shard")
        actual, top = _hash_and_max_id(path, dtype)
        if actual != entry["sha256"]:
            raise MobiLlamaError(
                f"{path}: sha256 {actual[:16]}… does not match the manifest's {str(entry['sha256'])[:16]}… "
                "(corrupt or modified shard; re-run 'mobillama data prepare')"
            )
        if top >= manifest["vocab_size"]:
            raise MobiLlamaError(
                f"{path}: token id {top} >= the manifest's vocab_size {manifest['vocab_size']}"
            )
    return path


def open_split(directory: str | Path, split: str = "train", *, verify: bool = True) -> list[np.ndarray]:
    """Memory-mapped shards of one split, each shaped ``[num_samples, sample_len]`` (read-only).

    With ``verify`` each shard's sha256 and token ids are checked first (one read of the data); existence,
    size and row counts are always checked. Nothing is loaded into RAM: rows are read when indexed.
    """
    return read_split(directory, split, verify=verify)[1]


def read_split(
    directory: str | Path, split: str = "train", *, verify: bool = True
) -> tuple[dict, list[np.ndarray]]:
    """(manifest, memmapped shards) of one split: :func:`open_split` for callers that need both."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    entries = split_entries(manifest, split, directory)
    dtype, width = SHARD_DTYPES[manifest["dtype"]], manifest["sample_len"]
    out = []
    for entry in entries:
        path = check_shard(directory, entry, manifest, verify_hash=verify)
        if entry["num_samples"] == 0:  # an empty file cannot be memory-mapped
            out.append(np.zeros((0, width), dtype))
            continue
        out.append(np.memmap(path, dtype=dtype, mode="r").reshape(-1, width))
    listed = manifest["splits"][split].get("num_samples")
    held = sum(len(rows) for rows in out)
    if listed is not None and listed != held:
        raise MobiLlamaError(
            f"{directory / MANIFEST}: the {split} split lists {listed} samples, its shards hold {held}"
        )
    return manifest, out


def verify_shards(directory: str | Path, splits: Sequence[str] | None = None) -> dict:
    """Check every shard (and document index) of the given splits against the manifest; return it."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    for split in splits or list(manifest["splits"]):
        open_split(directory, split, verify=True)
        doc_index = manifest["splits"][split].get("doc_index")
        if doc_index and sha256_file(directory / doc_index["path"]) != doc_index["sha256"]:
            raise MobiLlamaError(f"{directory / doc_index['path']}: sha256 does not match the manifest")
    return manifest


def manifest_layout(manifest: dict) -> dict[str, int | None]:
    """How documents are framed, as a manifest records it; manifests written before the fields existed
    framed every document as ``<s> ... </s>`` (``bos_id`` and ``eos_id``)."""
    add_bos = manifest.get("add_bos", True)
    return {
        "bos_id": manifest["bos_id"] if add_bos else None,
        "separator_id": manifest.get("separator_id", manifest["eos_id"]),
    }


def trace_sample(directory: str | Path, split: str, sample: int) -> list[dict]:
    """Which source documents (file + locator) contribute tokens to row ``sample`` of ``split``."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    info = manifest["splits"].get(split)
    if info is None:
        raise MobiLlamaError(f"{directory}: no {split!r} split")
    if not 0 <= sample < info["num_samples"]:
        raise MobiLlamaError(f"sample {sample} is out of range: the {split} split has {info['num_samples']}")
    index = np.load(directory / info["doc_index"]["path"], allow_pickle=False)
    begin, end = sample * manifest["sample_len"], (sample + 1) * manifest["sample_len"]
    starts, lengths = index[:, 2], index[:, 3]
    hits = np.nonzero((starts < end) & (starts + lengths > begin))[0]
    paths = {s["id"]: s["path"] for s in manifest["sources"]}
    return [
        {
            "source": paths[int(index[i, 0])],
            "locator": int(index[i, 1]),
            "tokens_in_sample": int(min(end, starts[i] + lengths[i]) - max(begin, starts[i])),
        }
        for i in hits
    ]


def inspect_shards(
    directory: str | Path, *, split: str = "train", sample: int = 0, show_tokens: int = 64
) -> str:
    """A human-readable summary of a shard directory plus one decoded sample and its provenance."""
    directory = Path(directory)
    m = load_manifest(directory)
    lines = [
        f"{directory}: {m['format']} v{m['format_version']}, seq_len {m['seq_len']}, {m['dtype']}, vocab {m['vocab_size']}",
        f"tokenizer sha256 {m['tokenizer_sha256'][:16]}…, seed {m['seed']}, {len(m['sources'])} source file(s)",
        f"documents: {m['documents']['used']} used, {m['skipped']['total']} skipped {m['skipped']['by_reason'] or ''}".rstrip(),
        "each document: {}tokens, then separator id {}".format(
            "" if (layout := manifest_layout(m))["bos_id"] is None else f"BOS id {layout['bos_id']}, ",
            layout["separator_id"],
        ),
    ]
    for name, s in m["splits"].items():
        lines.append(
            f"  {name}: {s['num_samples']} samples in {len(s['shards'])} shard(s), {s['num_tokens']} tokens, "
            f"{s['num_documents']} documents, {s['dropped_tokens']} tail tokens dropped"
        )
    if split in m["splits"] and show_tokens > 0:
        rows = open_split(directory, split, verify=False)
        offsets = [e["sample_offset"] for e in m["splits"][split]["shards"]]
        if not 0 <= sample < m["splits"][split]["num_samples"]:
            raise MobiLlamaError(f"sample {sample} is out of range for the {split} split")
        shard = max(i for i, o in enumerate(offsets) if o <= sample)
        row = rows[shard][sample - offsets[shard]]
        tok = load_tokenizer(directory / m["tokenizer"]["dir"])
        lines.append(f"{split} sample {sample}, first {show_tokens} tokens: {row[:show_tokens].tolist()}")
        lines.append("decoded: " + repr(tok.decode(row[:show_tokens].tolist())))
        for t in trace_sample(directory, split, sample):
            lines.append(f"  from {t['source']} (locator {t['locator']}): {t['tokens_in_sample']} tokens")
    return "\n".join(lines)
