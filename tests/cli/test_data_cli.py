"""The data commands end to end through ``mobillama.cli.main``: success output and one-line errors."""

from __future__ import annotations

import json

from mobillama.cli import main
from mobillama.data.sources import PYDOC_TOPICS, SkipLog, Source, iter_documents, stdlib_dir

TOPICS = [
    t
    for _, t in iter_documents(Source(stdlib_dir() / "pydoc_data" / "topics.py", PYDOC_TOPICS), 0, SkipLog())
]


def test_tokenizer_train_then_prepare_inspect_verify(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TOPICS[:30]):
        (corpus / f"{i:02d}.txt").write_text(text)
    (corpus / "bad.txt").write_bytes(b"\xff\xfe")
    tok_dir = tmp_path / "tok"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(corpus),
                "--vocab-size",
                "300",
                "--out",
                str(tok_dir),
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"wrote {tok_dir}: vocab 300" in out and "skipped 1 document(s): {'invalid_utf8': 1}" in out

    shards = tmp_path / "shards"
    argv = ["data", "prepare", "--input", str(corpus), "--tokenizer", str(tok_dir), "--out", str(shards)]
    argv += [
        "--seq-len",
        "128",
        "--chunks",
        "2",
        "--val-fraction",
        "0.1",
        "--workers",
        "2",
        "--seed",
        "3",
        "--quiet",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "30 documents" in out and "train:" in out and "val:" in out and "invalid_utf8" in out
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["seed"] == 3 and len(manifest["splits"]["train"]["shards"]) == 2

    assert main(["data", "inspect", str(shards), "--sample", "1", "--tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "train sample 1, first 16 tokens" in out and "decoded:" in out and "from " in out
    assert main(["data", "verify", str(shards)]) == 0
    assert "all 3 shard(s) match" in capsys.readouterr().out


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "prepare",
                "--input",
                str(tmp_path / "nope"),
                "--tokenizer",
                "x",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "tokenizer not found" in err
    assert (
        main(
            ["tokenizer", "train", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "t"), "--quiet"]
        )
        == 2
    )
    assert "input not found" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "t").exists()
