"""Text sources: turn user paths (or a named corpus) into an ordered list of files, and files into documents.

Formats, chosen by file name:

======================  =========================================================================
``*.jsonl``/``*.ndjson`` one JSON object per line; the document is the ``text_field`` value
``*.parquet``            one document per row of the ``text_field`` column (read with pyarrow)
HF dataset directory     written by ``datasets.save_to_disk`` (``state.json`` + ``*.arrow``, or a
                         ``dataset_dict.json`` with one sub-directory per split); read with pyarrow
anything else            plain text: the whole file is one document (``.gz``/``.bz2``/``.xz`` are
                         decompressed; ``.jsonl.gz`` is compressed JSONL)
======================  =========================================================================

Inputs may be files, directories (walked recursively in sorted order, hidden entries skipped) and glob
patterns (``**`` allowed). Order is deterministic: inputs as given, then sorted paths within each.

Named sources (``--source NAME``):

* ``stdlib``: the running Python's standard library ``*.py`` files (no ``site-packages``) plus the prose
  of ``pydoc_data/topics.py`` (one document per help topic). Present in every Python installation, so the
  demo and the tests need no download.
* ``english`` or ``english:DIR``: the English corpora fetched by ``scripts/fetch_english_corpus.sh``
  (default DIR ``$MOBILLAMA_ENGLISH_DIR`` or ``~/.cache/mobillama/english``).

Nothing is silently dropped: a document that cannot be used (empty, binary, invalid UTF-8, too long, a
JSONL line that is not JSON or lacks the field, an unreadable file) is reported to a :class:`SkipLog`
with its reason and location, and counted in the manifest. ``strict`` turns the first skip into an error.
"""

from __future__ import annotations

import ast
import bz2
import glob
import gzip
import json
import lzma
import os
import sysconfig
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from mobillama.checkpoint import read_json_object
from mobillama.errors import MobiLlamaError

TEXT, JSONL, PARQUET, ARROW, PYDOC_TOPICS = "text", "jsonl", "parquet", "arrow", "pydoc_topics"
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_MAX_DOC_BYTES = 16 << 20
NAMED_SOURCES = ("stdlib", "english")
MAX_SKIP_EXAMPLES = 20


@dataclass(frozen=True)
class Source:
    """One input file and how to read it."""

    path: Path
    format: str
    text_field: str | None = None

    def describe(self) -> dict:
        d = {"path": str(self.path), "format": self.format}
        if self.text_field is not None:
            d["text_field"] = self.text_field
        return d


@dataclass
class SkipLog:
    """Counts skipped documents by reason (overall and per source) and keeps the first few examples."""

    strict: bool = False
    by_reason: Counter = field(default_factory=Counter)
    by_source: dict[int, Counter] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)

    def skip(self, source_id: int, source: Source, reason: str, where: str, detail: str = "") -> None:
        message = (
            f"{source.path}{' ' + where if where else ''}: {reason}{' (' + detail + ')' if detail else ''}"
        )
        if self.strict:
            raise MobiLlamaError(f"{message} (--strict stops at the first bad document)")
        self.by_reason[reason] += 1
        self.by_source.setdefault(source_id, Counter())[reason] += 1
        if len(self.examples) < MAX_SKIP_EXAMPLES:
            self.examples.append(
                {"source": str(source.path), "where": where, "reason": reason, "detail": detail}
            )

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


# ---- resolving inputs -------------------------------------------------------------------------------------
def resolve_sources(
    inputs: Sequence[str | Path] = (),
    *,
    source: str | None = None,
    text_field: str = "text",
    split: str = "train",
) -> list[Source]:
    """Expand user inputs and/or a named source into an ordered, de-duplicated list of :class:`Source`."""
    if not inputs and not source:
        raise MobiLlamaError("no input: give --input PATHS and/or --source NAME")
    found: list[Source] = []
    if source:
        found += named_source(source)
    for item in inputs:
        found += _expand(str(item), text_field=text_field, split=split)
    seen, unique = set(), []
    for s in found:
        if s.path not in seen:
            seen.add(s.path)
            unique.append(s)
    if not unique:
        raise MobiLlamaError(f"no input files found in {', '.join(map(str, inputs)) or source}")
    return unique


def _expand(item: str, *, text_field: str, split: str) -> list[Source]:
    path = Path(item).expanduser()
    if path.exists():
        return _from_existing(path, text_field=text_field, split=split)
    if glob.has_magic(item):
        matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
        if not matches:
            raise MobiLlamaError(f"input pattern matched nothing: {item}")
        out = []
        for m in matches:
            out += _from_existing(Path(m), text_field=text_field, split=split)
        return out
    raise MobiLlamaError(f"input not found: {item}")


def _from_existing(path: Path, *, text_field: str, split: str) -> list[Source]:
    path = path.resolve()
    if path.is_file():
        return [Source(path, _format_of(path), text_field if _format_of(path) != TEXT else None)]
    if not path.is_dir():
        raise MobiLlamaError(f"input is neither a file nor a directory: {path}")
    if _is_hf_dataset(path):
        return hf_dataset_sources(path, text_field=text_field, split=split)
    out = []
    for root, dirs, files in os.walk(path):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        kept = []
        for d in dirs:
            if _is_hf_dataset(root_path / d):
                out += hf_dataset_sources(root_path / d, text_field=text_field, split=split)
            else:
                kept.append(d)
        dirs[:] = kept
        for name in sorted(files):
            if not name.startswith("."):
                f = root_path / name
                fmt = _format_of(f)
                out.append(Source(f, fmt, text_field if fmt != TEXT else None))
    out.sort(key=lambda s: s.path)  # os.walk interleaves levels; sort for a stable, readable order
    return out


def _format_of(path: Path) -> str:
    name = path.name.lower()
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    if name.endswith(JSONL_SUFFIXES):
        return JSONL
    if path.name.lower().endswith(".parquet"):
        return PARQUET
    if path.name.lower().endswith(".arrow"):
        return ARROW
    return TEXT


def _is_hf_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def hf_dataset_sources(path: Path, *, text_field: str, split: str) -> list[Source]:
    """The arrow files of a ``save_to_disk`` dataset (or of one split of a DatasetDict), in order."""
    dict_file = path / "dataset_dict.json"
    if dict_file.is_file():
        splits = read_json_object(dict_file).get("splits", [])
        if split not in splits:
            raise MobiLlamaError(
                f"{path}: no split {split!r} (splits: {', '.join(splits) or 'none'}; use --split)"
            )
        path = path / split
    state = read_json_object(path / "state.json")
    files = [f.get("filename") for f in state.get("_data_files", [])]
    if not files or not all(isinstance(f, str) for f in files):
        raise MobiLlamaError(f"{path / 'state.json'}: no '_data_files' list (not a save_to_disk dataset?)")
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise MobiLlamaError(f"{path}: data file {missing[0]} listed in state.json is missing")
    return [Source((path / f).resolve(), ARROW, text_field) for f in files]


# ---- named sources ---------------------------------------------------------------------------------------
def named_source(spec: str) -> list[Source]:
    name, _, arg = spec.partition(":")
    if name == "stdlib":
        if arg:
            raise MobiLlamaError("--source stdlib takes no argument")
        return stdlib_sources()
    if name == "english":
        return english_sources(Path(arg) if arg else None)
    raise MobiLlamaError(f"unknown --source {spec!r}; known: {', '.join(NAMED_SOURCES)}")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_sources(root: Path | None = None) -> list[Source]:
    """Python's own standard library: ``*.py`` code plus ``pydoc_data/topics.py`` prose (~30 MB)."""
    root = root or stdlib_dir()
    topics = root / "pydoc_data" / "topics.py"
    code = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        code += [Path(dirpath) / f for f in files if f.endswith(".py")]
    code = sorted(p for p in code if p != topics)
    if not code:
        raise MobiLlamaError(f"no Python standard library found under {root}")
    out = [Source(p, TEXT) for p in code]
    if topics.is_file():
        out.append(Source(topics, PYDOC_TOPICS))
    return out


def default_english_dir() -> Path:
    return Path(os.environ.get("MOBILLAMA_ENGLISH_DIR", "~/.cache/mobillama/english")).expanduser()


# (sub-directory, glob, format) of each corpus scripts/fetch_english_corpus.sh unpacks
ENGLISH_LAYOUT = (
    ("linux-doc", "**/*.rst.gz", TEXT),
    ("python-doc", "**/*.txt", TEXT),
    ("shakespeare", "*_gut.txt", TEXT),
    ("kjv", "*.txt", TEXT),
)


def english_sources(root: Path | None = None) -> list[Source]:
    root = (root or default_english_dir()).expanduser()
    if not root.is_dir():
        raise MobiLlamaError(
            f"English corpus not found at {root}: run scripts/fetch_english_corpus.sh {root} first"
        )
    out = []
    for sub, pattern, fmt in ENGLISH_LAYOUT:
        out += [Source(p.resolve(), fmt) for p in sorted((root / sub).glob(pattern)) if p.is_file()]
    if not out:
        raise MobiLlamaError(
            f"{root} holds none of the expected corpora ({', '.join(s for s, _, _ in ENGLISH_LAYOUT)})"
        )
    return out


# ---- reading documents -----------------------------------------------------------------------------------
def iter_documents(
    source: Source, source_id: int, skips: SkipLog, *, max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES
) -> Iterator[tuple[int, str]]:
    """Yield ``(locator, text)`` for each usable document of ``source``; report the rest to ``skips``.

    The locator says where the document came from: 0 for a whole text file, the 1-based line for JSONL,
    the row for Parquet/arrow, the topic's index for pydoc topics.
    """
    reader = {TEXT: _text_docs, JSONL: _jsonl_docs, PARQUET: _parquet_docs, ARROW: _arrow_docs,
              PYDOC_TOPICS: _topics_docs}[source.format]  # fmt: skip
    try:
        yield from reader(source, source_id, skips, max_doc_bytes)
    except (OSError, EOFError, ValueError, lzma.LZMAError) as e:
        if isinstance(e, MobiLlamaError):
            raise
        skips.skip(source_id, source, "unreadable_file", "", f"{type(e).__name__}: {str(e)[:160]}")


def _open_binary(path: Path) -> IO[bytes]:
    opener = COMPRESSED.get(path.suffix.lower())
    return opener(path, "rb") if opener else open(path, "rb")


def _check_text(raw: bytes, source: Source, source_id: int, skips: SkipLog, where: str) -> str | None:
    if b"\x00" in raw:
        skips.skip(source_id, source, "binary", where, "contains NUL bytes")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        skips.skip(source_id, source, "invalid_utf8", where, f"byte {e.start}")
        return None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        skips.skip(source_id, source, "empty", where)
        return None
    return text


def _text_docs(source: Source, sid: int, skips: SkipLog, max_bytes: int) -> Iterator[tuple[int, str]]:
    with _open_binary(source.path) as f:
        raw = f.read(max_bytes + 1)  # never more than the cap in memory, however large the file
    if len(raw) > max_bytes:
        skips.skip(sid, source, "too_long", "", f"more than {max_bytes} bytes")
        return
    text = _check_text(raw, source, sid, skips, "")
    if text is not None:
        yield 0, text


def _jsonl_docs(source: Source, sid: int, skips: SkipLog, max_bytes: int) -> Iterator[tuple[int, str]]:
    field_name = source.text_field or "text"
    with _open_binary(source.path) as f:
        line_no = 0
        while True:
            raw = f.readline(max_bytes + 1)
            if not raw:
                return
            line_no += 1
            where = f"line {line_no}"
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass  # stream past the rest of the over-long line
                skips.skip(sid, source, "too_long", where, f"more than {max_bytes} bytes")
                continue
            if not raw.strip():
                skips.skip(sid, source, "blank_line", where)
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skips.skip(sid, source, "invalid_utf8", where, f"byte {e.start}")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                skips.skip(sid, source, "invalid_json", where, e.msg)
                continue
            if not isinstance(obj, dict) or field_name not in obj or obj[field_name] is None:
                skips.skip(sid, source, "missing_field", where, f"no {field_name!r}")
                continue
            text = obj[field_name]
            if not isinstance(text, str):
                skips.skip(sid, source, "wrong_type", where, f"{field_name!r} is {type(text).__name__}")
                continue
            if not text.strip():
                skips.skip(sid, source, "empty", where)
                continue
            yield line_no, text


def _column_docs(
    batches, source: Source, sid: int, skips: SkipLog, max_bytes: int
) -> Iterator[tuple[int, str]]:
    row = 0
    for batch in batches:
        for value in batch.column(0).to_pylist():
            where = f"row {row}"
            if value is None:
                skips.skip(sid, source, "missing_field", where, "null")
            elif not value.strip():
                skips.skip(sid, source, "empty", where)
            elif len(value) > max_bytes // 4 and len(value.encode("utf-8")) > max_bytes:
                skips.skip(sid, source, "too_long", where, f"more than {max_bytes} bytes")
            else:
                yield row, value
            row += 1


# pyarrow (~0.5 s to import) is imported in the functions below: only Parquet and arrow inputs need it.
def _check_column(schema, source: Source) -> int:
    import pyarrow as pa

    name = source.text_field or "text"
    if name not in schema.names:
        raise MobiLlamaError(
            f"{source.path}: no column {name!r} (columns: {', '.join(schema.names)}; use --text-field)"
        )
    col_type = schema.field(name).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise MobiLlamaError(f"{source.path}: column {name!r} holds {col_type}, not text")
    return schema.get_field_index(name)


def _parquet_docs(source: Source, sid: int, skips: SkipLog, max_bytes: int) -> Iterator[tuple[int, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source.path)
    except (pa.ArrowException, OSError) as e:
        skips.skip(sid, source, "unreadable_file", "", f"{type(e).__name__}: {str(e)[:160]}")
        return
    _check_column(pf.schema_arrow, source)
    batches = pf.iter_batches(batch_size=1024, columns=[source.text_field or "text"])
    try:
        yield from _column_docs(batches, source, sid, skips, max_bytes)
    except pa.ArrowException as e:
        skips.skip(sid, source, "unreadable_file", "", f"{type(e).__name__}: {str(e)[:160]}")


def _arrow_docs(source: Source, sid: int, skips: SkipLog, max_bytes: int) -> Iterator[tuple[int, str]]:
    import pyarrow as pa

    try:
        with pa.memory_map(str(source.path)) as mm:
            try:  # datasets.save_to_disk writes the IPC stream format; accept the file format too
                reader = pa.ipc.open_stream(mm)
                schema, batches = reader.schema, iter(reader)
            except pa.ArrowInvalid:
                mm.seek(0)
                reader = pa.ipc.open_file(mm)
                schema = reader.schema
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            index = _check_column(schema, source)
            yield from _column_docs((b.select([index]) for b in batches), source, sid, skips, max_bytes)
    except pa.ArrowException as e:
        skips.skip(sid, source, "unreadable_file", "", f"{type(e).__name__}: {str(e)[:160]}")


def _topics_docs(source: Source, sid: int, skips: SkipLog, max_bytes: int) -> Iterator[tuple[int, str]]:
    """The help topics of ``pydoc_data/topics.py``, read as a literal (never imported or executed)."""
    tree = ast.parse(source.path.read_bytes(), filename=str(source.path))
    topics = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
    if not isinstance(topics, dict):
        raise MobiLlamaError(f"{source.path}: no 'topics' dictionary")
    for i, key in enumerate(sorted(topics)):
        text = topics[key]
        if isinstance(text, str) and text.strip():
            yield i, text
        else:
            skips.skip(sid, source, "empty", f"topic {key!r}")


def iter_texts(
    sources: Sequence[Source], skips: SkipLog | None = None, *, max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES
) -> Iterator[str]:
    """Just the texts of all sources, in order (tokenizer training reads this)."""
    skips = skips if skips is not None else SkipLog()
    for sid, source in enumerate(sources):
        for _, text in iter_documents(source, sid, skips, max_doc_bytes=max_doc_bytes):
            yield text
