"""data prepare: determinism, manifest completeness, packing layout, document-level split, dtype choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mobillama.checkpoint import sha256_file
from mobillama.data.prepare import prepare_corpus
from mobillama.data.shards import (
    MANIFEST,
    inspect_shards,
    load_manifest,
    manifest_layout,
    open_split,
    shard_dtype,
    trace_sample,
    verify_shards,
)
from mobillama.tokenizer import load_tokenizer


def prep(inputs, tokenizer_dir, out, **kw):
    kw.setdefault("seq_len", 64)
    kw.setdefault("workers", 1)
    kw.setdefault("val_fraction", 0.2)
    return prepare_corpus(inputs, tokenizer_dir, out, progress=False, **kw)


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def document_text(source: dict, locator: int) -> str:
    path = Path(source["path"])
    if source["format"] == "jsonl":
        line = path.read_text(encoding="utf-8").splitlines()[locator - 1]
        return json.loads(line)[source.get("text_field", "text")]
    assert locator == 0
    return path.read_text(encoding="utf-8")


def split_stream(out: Path, split: str) -> np.ndarray:
    return np.concatenate([s.reshape(-1) for s in open_split(out, split)])


def test_same_inputs_and_seed_give_byte_identical_output_for_any_worker_count(
    tmp_path, text_corpus, tokenizer_dir
):
    prep([text_corpus], tokenizer_dir, tmp_path / "a", chunks=3)
    prep([text_corpus], tokenizer_dir, tmp_path / "b", chunks=3)
    prep([text_corpus], tokenizer_dir, tmp_path / "c", chunks=3, workers=2)
    a = dir_bytes(tmp_path / "a")
    assert {"manifest.json", "train-00000.bin", "train-00002.bin", "val-00000.bin", "train-docs.npy"} <= set(
        a
    )
    assert a == dir_bytes(tmp_path / "b")
    assert a == dir_bytes(tmp_path / "c")
    prep([text_corpus], tokenizer_dir, tmp_path / "d", chunks=3, seed=1)
    assert dir_bytes(tmp_path / "d")["train-00000.bin"] != a["train-00000.bin"]  # the seed matters


def check_packing(out: Path, m: dict, tok, head: list[int], tail: list[int]) -> None:
    """Every split's stream is its documents, each ``head + tokens + tail``, in the index's order."""
    sources = {s["id"]: s for s in m["sources"]}
    for split in ("train", "val"):
        index = np.load(out / m["splits"][split]["doc_index"]["path"])
        expected = []
        for source_id, locator, start, length in index.tolist():
            ids = [*head, *tok.encode(document_text(sources[source_id], locator), parse_special=False), *tail]
            assert start == len(expected) and length == len(ids)
            expected += ids
        got = split_stream(out, split)
        n = m["splits"][split]["num_samples"] * m["sample_len"]
        assert got.size == n and n <= len(expected) < n + m["sample_len"]
        assert got.tolist() == expected[:n]
        assert m["splits"][split]["dropped_tokens"] == len(expected) - n
        # shuffled: not the order the sources were listed in
        if split == "train":
            assert index[:, :2].tolist() != sorted(index[:, :2].tolist())


def test_rows_are_documents_wrapped_in_bos_eos_packed_in_shuffled_order(tmp_path, text_corpus, tokenizer_dir):
    out = tmp_path / "shards"
    m = prep([text_corpus], tokenizer_dir, out, chunks=2)
    tok = load_tokenizer(tokenizer_dir)
    assert (m["add_bos"], m["separator_id"]) == (True, tok.eos_id)
    assert m["document_layout"].startswith("<s> document tokens </s>")
    check_packing(out, m, tok, [tok.bos_id], [tok.eos_id])
    assert manifest_layout(m) == {"bos_id": 1, "separator_id": 2}


def test_a_smollm2_style_tokenizer_separates_documents_with_endoftext_and_no_bos(
    tmp_path, text_corpus, smol_tokenizer_dir
):
    out = tmp_path / "shards"
    m = prep([text_corpus], smol_tokenizer_dir, out, chunks=2)
    tok = load_tokenizer(smol_tokenizer_dir)
    assert (m["add_bos"], m["separator_id"], m["bos_id"], m["eos_id"]) == (False, 0, 1, 2)
    assert m["document_layout"].startswith("document tokens <|endoftext|>")
    check_packing(out, m, tok, [], [0])
    stream = split_stream(out, "train")
    assert 1 not in stream.tolist() and 2 not in stream.tolist()  # no <|im_start|>, no <|im_end|>
    assert manifest_layout(m) == {"bos_id": None, "separator_id": 0}
    assert load_tokenizer(out / "tokenizer").add_bos is False  # the copy keeps the convention
    assert "each document: tokens, then separator id 0" in inspect_shards(out)


def test_manifests_written_before_the_layout_fields_still_read_as_bos_eos(
    tmp_path, text_corpus, tokenizer_dir
):
    out = tmp_path / "shards"
    m = prep([text_corpus], tokenizer_dir, out)
    old = {k: v for k, v in m.items() if k not in ("add_bos", "separator_id")}
    (out / MANIFEST).write_text(json.dumps(old))
    assert manifest_layout(load_manifest(out)) == {"bos_id": 1, "separator_id": 2}
    assert "BOS id 1, tokens, then separator id 2" in inspect_shards(out)


def test_manifest_names_every_source_shard_and_setting(tmp_path, text_corpus, tokenizer_dir):
    (text_corpus / "empty.txt").write_text("")
    out = tmp_path / "shards"
    m = prep([text_corpus], tokenizer_dir, out, chunks=2, seed=7)
    assert m == json.loads((out / MANIFEST).read_text())
    tok = load_tokenizer(tokenizer_dir)
    assert (m["format"], m["format_version"], m["seq_len"], m["sample_len"]) == (
        "mobillama-token-shards",
        1,
        64,
        65,
    )
    assert (m["dtype"], m["vocab_size"], m["bos_id"], m["eos_id"], m["seed"]) == ("uint16", 320, 1, 2, 7)
    assert m["tokenizer_sha256"] == tok.sha256 == load_tokenizer(out / "tokenizer").sha256
    assert len(m["sources"]) == 14  # 12 .txt + empty.txt + more.jsonl, sorted by path
    assert [s["path"] for s in m["sources"]] == sorted(s["path"] for s in m["sources"])
    for s in m["sources"]:
        assert s["size"] == Path(s["path"]).stat().st_size and s["sha256"] == sha256_file(s["path"])
    by_name = {Path(s["path"]).name: s for s in m["sources"]}
    assert by_name["more.jsonl"]["documents"] == 12 and by_name["more.jsonl"]["text_field"] == "text"
    assert by_name["empty.txt"] == {
        **by_name["empty.txt"],
        "documents": 0,
        "tokens": 0,
        "skipped": {"empty": 1},
    }
    assert m["skipped"]["total"] == 1 and m["skipped"]["by_reason"] == {"empty": 1}
    assert m["skipped"]["examples"][0]["source"].endswith("empty.txt")
    assert m["documents"]["used"] == 24 == m["documents"]["train"] + m["documents"]["val"]
    assert sum(s["tokens"] for s in m["sources"]) == m["tokens"]["documents"]
    for split in m["splits"].values():
        assert split["num_samples"] == sum(sh["num_samples"] for sh in split["shards"])
        assert split["num_tokens"] == split["num_samples"] * 65
        for sh in split["shards"]:
            assert sh["sha256"] == sha256_file(out / sh["path"])
            assert sh["bytes"] == (out / sh["path"]).stat().st_size == sh["num_samples"] * 65 * 2
    assert [sh["sample_offset"] for sh in m["splits"]["train"]["shards"]] == [
        0,
        m["splits"]["train"]["shards"][0]["num_samples"],
    ]
    assert verify_shards(out) == m
    assert not list(tmp_path.glob(".shards.tmp-*"))  # no temporary leftovers


def test_validation_split_is_by_whole_document(tmp_path, text_corpus, tokenizer_dir):
    out = tmp_path / "shards"
    m = prep([text_corpus], tokenizer_dir, out, val_fraction=0.25)
    train = np.load(out / "train-docs.npy")
    val = np.load(out / "val-docs.npy")
    assert len(val) == round(24 * 0.25) == m["documents"]["val"]
    train_docs = {tuple(r) for r in train[:, :2].tolist()}
    val_docs = {tuple(r) for r in val[:, :2].tolist()}
    assert not train_docs & val_docs and len(train_docs | val_docs) == 24
    # every val document's tokens start and end inside the val stream (it is not cut between splits)
    stream = split_stream(out, "val")
    _, _, start, length = val[0].tolist()
    assert stream[start] == 1 and stream[start + length - 1] == 2
    no_val = prep([text_corpus], tokenizer_dir, tmp_path / "noval", val_fraction=0)
    assert set(no_val["splits"]) == {"train"} and no_val["documents"]["train"] == 24


def test_dtype_is_uint16_when_the_vocab_fits_else_uint32(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    assert shard_dtype(65536) == np.uint16 and shard_dtype(65537) == np.uint32
    # a word-level tokenizer with 70k words: ids above 65535 must survive in the shards
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(70000)}}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # Llama's convention: the post-processor puts <s> first, so documents are framed <s> ... </s>
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "in.txt").write_text("w5 w69999 w65536 " * 40)
    out = tmp_path / "shards"
    m = prep([tmp_path / "in.txt"], tmp_path / "tokenizer.json", out, seq_len=16, val_fraction=0)
    assert (m["dtype"], m["vocab_size"]) == ("uint32", 70003)
    rows = open_split(out, "train")[0]
    assert rows.dtype == np.uint32 and rows.shape[1] == 17
    assert rows.reshape(-1)[:7].tolist() == [1, 8, 70002, 65539, 8, 70002, 65539]


def test_trace_sample_names_the_source_documents(tmp_path, text_corpus, tokenizer_dir):
    out = tmp_path / "shards"
    m = prep([text_corpus], tokenizer_dir, out)
    last = m["splits"]["train"]["num_samples"] - 1
    for sample in (0, last):
        trace = trace_sample(out, "train", sample)
        assert trace and sum(t["tokens_in_sample"] for t in trace) == 65
        assert all(t["source"] in {s["path"] for s in m["sources"]} for t in trace)
    with pytest.raises(Exception, match="out of range"):
        trace_sample(out, "train", last + 1)


def test_load_manifest_reads_back_the_consumer_keys(tmp_path, text_corpus, tokenizer_dir):
    out = tmp_path / "shards"
    prep([text_corpus], tokenizer_dir, out, chunks=2)
    m = load_manifest(out)
    rows = open_split(out, "train")
    assert [r.shape for r in rows] == [
        (sh["num_samples"], m["sample_len"]) for sh in m["splits"]["train"]["shards"]
    ]
    assert isinstance(rows[0].base, np.memmap) or isinstance(rows[0], np.memmap)  # streamed, not loaded
