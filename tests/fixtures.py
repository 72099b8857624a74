"""Builders shared by every test folder: token-shard directories, small tokenizers and tiny checkpoints.

Importable as ``fixtures`` (pyproject's pytest ``pythonpath``): pytest's importlib mode makes conftest
files unimportable by name, so what several folders build lives here, once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from mobillama.data.shards import FORMAT, FORMAT_VERSION, MANIFEST


def write_token_shards(
    out: Path,
    splits: dict[str, list[np.ndarray]],
    *,
    vocab_size: int,
    dtype: str = "uint16",
    bos_id: int = 1,
    eos_id: int = 2,
    split_fields: dict[str, dict] | None = None,
) -> Path:
    """A shard directory in the format of :mod:`mobillama.data.shards`, written here with numpy
    (independent of ``mobillama data prepare``): ``splits`` maps a split to its shards' rows, each an
    array ``[num_samples, seq_len + 1]``; ``split_fields`` adds fields to a split's manifest entry."""
    widths = {rows.shape[1] for shards in splits.values() for rows in shards}
    assert len(widths) == 1, f"every row must have the same length, got {sorted(widths)}"
    sample_len = widths.pop()
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "seq_len": sample_len - 1,
        "sample_len": sample_len,
        "dtype": dtype,
        "vocab_size": vocab_size,
        "tokenizer_sha256": "test",
        "bos_id": bos_id,
        "eos_id": eos_id,
        "splits": {},
    }
    for split, shards in splits.items():
        entries, offset = [], 0
        for i, rows in enumerate(shards):
            path = out / f"{split}-{i:05d}.bin"
            rows.astype(dtype).tofile(path)
            entries.append(
                {
                    "path": path.name,
                    "num_samples": len(rows),
                    "sample_offset": offset,
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                }
            )
            offset += len(rows)
        manifest["splits"][split] = {
            "shards": entries,
            "num_samples": offset,
            "num_tokens": offset * sample_len,
            **(split_fields or {}).get(split, {}),
        }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def edit_manifest(directory: Path, edit) -> None:
    """Apply ``edit(manifest)`` to ``directory``'s manifest.json in place."""
    manifest = json.loads((directory / MANIFEST).read_text())
    edit(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))
