"""Fixtures for the data tests: a tiny trained tokenizer and small real-text corpora built in tmp dirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mobillama.data.sources import PYDOC_TOPICS, SkipLog, Source, iter_documents, stdlib_dir


def real_documents(n: int = 40, offset: int = 0) -> list[str]:
    """Real English prose: the help topics of this Python's pydoc_data (always installed)."""
    topics = stdlib_dir() / "pydoc_data" / "topics.py"
    docs = [text for _, text in iter_documents(Source(topics, PYDOC_TOPICS), 0, SkipLog())]
    return docs[offset : offset + n]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from mobillama.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(real_documents(60), 320, out, progress=False)
    return out


@pytest.fixture
def text_corpus(tmp_path) -> Path:
    """A directory of 12 plain-text documents plus a JSONL file of 12 more."""
    root = tmp_path / "corpus"
    root.mkdir()
    docs = real_documents(24)
    for i, doc in enumerate(docs[:12]):
        (root / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    with open(root / "more.jsonl", "w", encoding="utf-8") as f:
        for doc in docs[12:]:
            f.write(json.dumps({"text": doc, "meta": 1}) + "\n")
    return root
