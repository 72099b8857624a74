"""Every input format, named sources, and bad input: a clear error or a counted, reported skip."""

from __future__ import annotations

import bz2
import gzip
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from mobillama.data import sources as src
from mobillama.data.prepare import prepare_corpus
from mobillama.data.shards import open_split, verify_shards
from mobillama.data.sources import SkipLog, Source, iter_documents, resolve_sources, stdlib_sources
from mobillama.errors import MobiLlamaError
from mobillama.tokenizer import load_tokenizer


def docs_of(path, **kw) -> tuple[list[str], SkipLog]:
    skips = SkipLog()
    texts = []
    for sid, s in enumerate(resolve_sources([path], **kw)):
        texts += [t for _, t in iter_documents(s, sid, skips, max_doc_bytes=kw.pop("max_doc_bytes", 1 << 20))]
    return texts, skips


def prep(inputs, tokenizer_dir, out, **kw):
    kw.setdefault("seq_len", 32)
    kw.setdefault("workers", 1)
    kw.setdefault("val_fraction", 0)
    return prepare_corpus(inputs, tokenizer_dir, out, progress=False, **kw)


TOPICS = Source(src.stdlib_dir() / "pydoc_data" / "topics.py", src.PYDOC_TOPICS)
DOCS = [text for _, text in iter_documents(TOPICS, 0, SkipLog())][30:36]  # real prose, always installed


# ---- formats ---------------------------------------------------------------------------------------------
def test_plain_compressed_and_globbed_text_files(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0])
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(DOCS[1].encode()))
    (tmp_path / "c.md.bz2").write_bytes(bz2.compress(DOCS[2].encode()))
    (tmp_path / ".hidden.txt").write_text("not read")
    texts, skips = docs_of(tmp_path)
    assert texts == DOCS[:3] and skips.total == 0
    assert docs_of(str(tmp_path / "*.gz"))[0] == [DOCS[1]]
    assert docs_of(str(tmp_path / "**" / "*.bz2"))[0] == [DOCS[2]]


def test_jsonl_with_a_chosen_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    texts, _ = docs_of(path, text_field="body")
    assert texts == DOCS
    (tmp_path / "d2.jsonl.gz").write_bytes(gzip.compress(path.read_bytes()))
    assert docs_of(tmp_path / "d2.jsonl.gz", text_field="body")[0] == DOCS


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": DOCS, "n": list(range(6))}), tmp_path / "d.parquet", row_group_size=2)
    assert docs_of(tmp_path / "d.parquet", text_field="content")[0] == DOCS
    with pytest.raises(MobiLlamaError, match="no column 'text'.*content"):
        docs_of(tmp_path / "d.parquet")
    with pytest.raises(MobiLlamaError, match="column 'n' holds int64, not text"):
        docs_of(tmp_path / "d.parquet", text_field="n")


def test_huggingface_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": DOCS[:4] + [None, "  "]})
    ds.save_to_disk(str(tmp_path / "ds"))
    texts, skips = docs_of(tmp_path / "ds")
    assert texts == DOCS[:4] and dict(skips.by_reason) == {"missing_field": 1, "empty": 1}
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"t": DOCS[:3]}),
            "test": datasets.Dataset.from_dict({"t": DOCS[3:]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert docs_of(tmp_path / "dd", text_field="t")[0] == DOCS[:3]
    assert docs_of(tmp_path / "dd", text_field="t", split="test")[0] == DOCS[3:]
    with pytest.raises(MobiLlamaError, match="no split 'validation'.*train"):
        docs_of(tmp_path / "dd", text_field="t", split="validation")
    # a dataset directory nested in an input directory is recognised as one
    ds.save_to_disk(str(tmp_path / "outer" / "inner"))
    assert docs_of(tmp_path / "outer")[0] == DOCS[:4]


def test_all_formats_end_to_end_in_one_prepare(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt.gz").write_bytes(gzip.compress(DOCS[0].encode()))
    (tmp_path / "in" / "b.jsonl").write_text(json.dumps({"text": DOCS[1]}) + "\n")
    pq.write_table(pa.table({"text": DOCS[2:4]}), tmp_path / "in" / "c.parquet")
    m = prep([tmp_path / "in"], tokenizer_dir, tmp_path / "out")
    assert [s["format"] for s in m["sources"]] == ["text", "jsonl", "parquet"]
    assert [s["documents"] for s in m["sources"]] == [1, 1, 2]
    assert m["documents"]["used"] == 4 and m["skipped"]["total"] == 0


def test_stdlib_source_lists_real_code_and_pydoc_prose():
    sources = stdlib_sources()
    assert len(sources) > 500
    assert all("site-packages" not in s.path.parts for s in sources)
    assert [s.path for s in sources[:-1]] == sorted(s.path for s in sources[:-1])
    assert sources[-1].format == "pydoc_topics" and sources[-1].path.name == "topics.py"
    topics = [t for _, t in iter_documents(sources[-1], 0, SkipLog())]
    assert len(topics) > 50 and any("assert" in t for t in topics)
    assert resolve_sources(source="stdlib") == sources


def test_stdlib_source_end_to_end_on_a_small_stdlib(tmp_path, tokenizer_dir, monkeypatch):
    root = tmp_path / "lib"
    (root / "pydoc_data").mkdir(parents=True)
    (root / "site-packages").mkdir()
    (root / "site-packages" / "x.py").write_text("ignored = 1\n")
    real = src.stdlib_dir()
    for name in ("textwrap.py", "this.py", "pydoc_data/topics.py"):
        (root / name).write_bytes((real / name).read_bytes())
    monkeypatch.setattr(src, "stdlib_dir", lambda: root)
    m = prep([], tokenizer_dir, tmp_path / "out", source="stdlib", val_fraction=0.05)
    assert [Path(s["path"]).name for s in m["sources"]] == ["textwrap.py", "this.py", "topics.py"]
    assert m["source"] == "stdlib" and m["sources"][2]["documents"] > 50


def test_english_source_reads_the_fetched_layout(tmp_path):
    with pytest.raises(MobiLlamaError, match="fetch_english_corpus.sh"):
        resolve_sources(source=f"english:{tmp_path / 'nope'}")
    (tmp_path / "shakespeare").mkdir()
    (tmp_path / "shakespeare" / "lear_gut.txt").write_text(DOCS[0])
    (tmp_path / "kjv").mkdir()
    (tmp_path / "kjv" / "Genesis.txt").write_text(DOCS[1])
    (tmp_path / "linux-doc" / "x").mkdir(parents=True)
    (tmp_path / "linux-doc" / "x" / "a.rst.gz").write_bytes(gzip.compress(DOCS[2].encode()))
    names = [s.path.name for s in resolve_sources(source=f"english:{tmp_path}")]
    assert names == ["a.rst.gz", "lear_gut.txt", "Genesis.txt"]
    with pytest.raises(MobiLlamaError, match="unknown --source 'books'"):
        resolve_sources(source="books")


# ---- bad input --------------------------------------------------------------------------------------------
def test_missing_paths_and_empty_globs_are_errors(tmp_path, tokenizer_dir):
    with pytest.raises(MobiLlamaError, match="input not found: .*missing.txt"):
        resolve_sources([tmp_path / "missing.txt"])
    with pytest.raises(MobiLlamaError, match="matched nothing"):
        resolve_sources([str(tmp_path / "*.nothing")])
    with pytest.raises(MobiLlamaError, match="no input"):
        resolve_sources([])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(MobiLlamaError, match="no input files found"):
        resolve_sources([tmp_path / "empty_dir"])
    with pytest.raises(MobiLlamaError, match="tokenizer not found"):
        prep([tmp_path], tmp_path / "no_tokenizer", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_binary_and_non_utf8_documents_are_counted_skips(tmp_path, tokenizer_dir):
    (tmp_path / "good.txt").write_text(DOCS[0] * 3)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(DOCS[1].encode())[:30])  # truncated
    m = prep([tmp_path], tokenizer_dir, tmp_path / "out")
    assert m["skipped"]["by_reason"] == {"binary": 1, "empty": 2, "invalid_utf8": 1, "unreadable_file": 1}
    assert m["documents"]["used"] == 1
    reasons = {Path(e["source"]).name: e["reason"] for e in m["skipped"]["examples"]}
    assert reasons == {
        "bad.gz": "unreadable_file",
        "blank.txt": "empty",
        "empty.txt": "empty",
        "image.png": "binary",
        "latin1.txt": "invalid_utf8",
    }


def test_nothing_usable_is_an_error_and_leaves_no_output(tmp_path, tokenizer_dir):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.txt").write_text("")
    with pytest.raises(MobiLlamaError, match=r"no usable documents in the input \(empty: 1\)"):
        prep([tmp_path / "in"], tokenizer_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_strict_mode_stops_at_the_first_bad_document(tmp_path, tokenizer_dir):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(DOCS[0])
    (tmp_path / "in" / "b.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(MobiLlamaError, match=r"b.txt: invalid_utf8 \(byte 0\).*--strict"):
        prep([tmp_path / "in"], tokenizer_dir, tmp_path / "out", strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_jsonl_lines_that_are_not_json_or_lack_the_field_are_counted_with_line_numbers(tmp_path):
    lines = [
        json.dumps({"text": DOCS[0]}),
        "{not json",
        json.dumps({"other": "x"}),
        json.dumps({"text": 42}),
        "",
        json.dumps(["a list"]),
        json.dumps({"text": None}),
        json.dumps({"text": DOCS[1]}),
    ]
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff"}\n')
    texts, skips = docs_of(path)
    assert texts == DOCS[:2]
    assert dict(skips.by_reason) == {
        "invalid_json": 1,
        "missing_field": 3,
        "wrong_type": 1,
        "blank_line": 1,
        "invalid_utf8": 1,
    }
    assert [(e["where"], e["reason"]) for e in skips.examples] == [
        ("line 2", "invalid_json"),
        ("line 3", "missing_field"),
        ("line 4", "wrong_type"),
        ("line 5", "blank_line"),
        ("line 6", "missing_field"),
        ("line 7", "missing_field"),
        ("line 9", "invalid_utf8"),
    ]


def test_a_100_mb_single_line_is_skipped_without_reading_it_into_memory(tmp_path, tokenizer_dir):
    line = b"x" * (100 << 20)
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "huge.txt", "wb") as f:
        f.write(line)
    with open(tmp_path / "in" / "huge.jsonl", "wb") as f:
        f.write(b'{"text": "' + line + b'"}\n')
        f.write(json.dumps({"text": DOCS[0]}).encode() + b"\n")
    del line
    tracemalloc.start()
    try:
        m = prep([tmp_path / "in"], tokenizer_dir, tmp_path / "out", max_doc_bytes=4 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert m["skipped"]["by_reason"] == {"too_long": 2}
    assert [e["where"] for e in m["skipped"]["examples"]] == ["line 1", ""]
    assert m["documents"]["used"] == 1  # the JSONL line after the huge one is still read
    assert peak < 40 << 20  # streamed: never the 100 MB line in memory


def test_corrupted_truncated_or_missing_shards_fail_on_load(tmp_path, tokenizer_dir):
    (tmp_path / "a.txt").write_text(DOCS[0] * 4)
    out = tmp_path / "out"
    prep([tmp_path / "a.txt"], tokenizer_dir, out)
    shard = out / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(MobiLlamaError, match="train-00000.bin: sha256 .* does not match the manifest"):
        open_split(out, "train")
    with pytest.raises(MobiLlamaError, match="does not match"):
        verify_shards(out)
    assert open_split(out, "train", verify=False)[0].shape[1] == 33  # opt-out still checks the size
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(MobiLlamaError, match="truncated or modified"):
        open_split(out, "train", verify=False)
    shard.unlink()
    with pytest.raises(MobiLlamaError, match="missing"):
        open_split(out, "train")
    with pytest.raises(MobiLlamaError, match="no 'val' split"):
        open_split(out, "val")
    (out / "manifest.json").write_text("{broken")
    with pytest.raises(MobiLlamaError, match="manifest.json: not valid JSON"):
        open_split(out, "train")
    (out / "manifest.json").unlink()
    with pytest.raises(MobiLlamaError, match="no manifest.json"):
        open_split(out)


def test_option_errors_and_too_little_text(tmp_path, tokenizer_dir):
    (tmp_path / "a.txt").write_text(DOCS[0])
    a = [tmp_path / "a.txt"]
    for kw, msg in [
        ({"seq_len": 0}, "--seq-len"),
        ({"val_fraction": 1.0}, "--val-fraction"),
        ({"chunks": 0}, "--chunks"),
        ({"workers": 0}, "--workers"),
        ({"seq_len": 100000}, "fewer than one sample"),
        ({"chunks": 100000}, "more than the"),
        ({"val_fraction": 0.5}, "leaves no training documents"),
    ]:
        with pytest.raises(MobiLlamaError, match=msg):
            prep(a, tokenizer_dir, tmp_path / "out", **kw)
        assert not (tmp_path / "out").exists()
    prep(a, tokenizer_dir, tmp_path / "out")
    with pytest.raises(MobiLlamaError, match="already exists"):
        prep(a, tokenizer_dir, tmp_path / "out")
    prep(a, tokenizer_dir, tmp_path / "out", overwrite=True, seq_len=16)
    assert open_split(tmp_path / "out")[0].shape[1] == 17


def test_literal_special_token_text_in_documents_stays_text(tmp_path, tokenizer_dir):
    (tmp_path / "a.txt").write_text("html </s> and <s> tags " * 20)
    m = prep([tmp_path / "a.txt"], tokenizer_dir, tmp_path / "out", seq_len=16)
    rows = np.concatenate([r.reshape(-1) for r in open_split(tmp_path / "out")])
    tok = load_tokenizer(tokenizer_dir)
    assert (rows == tok.eos_id).sum() <= 1 and (rows == tok.bos_id).sum() == 1  # only the separators
    assert m["documents"]["used"] == 1


def test_sources_are_deduplicated_and_ordered_as_given(tmp_path):
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a.txt").write_text("a")
    got = resolve_sources([tmp_path / "b.txt", tmp_path, str(tmp_path / "*.txt")])
    assert [s.path.name for s in got] == ["b.txt", "a.txt"]
    assert all(isinstance(s, Source) for s in got)
