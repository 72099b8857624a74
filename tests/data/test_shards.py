"""The one shard reader: every check, and the loader and ``data verify`` refusing through it alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fixtures import edit_manifest, write_token_shards
from mobillama.data.loader import TokenSplit
from mobillama.data.shards import SHARD_DTYPES, open_split, read_split, shard_dtype, verify_shards
from mobillama.errors import MobiLlamaError

VOCAB = 100


def _rows(n: int, seed: int = 0, width: int = 9) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n, width))


@pytest.fixture
def shards(tmp_path) -> Path:
    return write_token_shards(
        tmp_path / "d", {"train": [_rows(5), _rows(3, 1)], "val": [_rows(2, 2)]}, vocab_size=VOCAB
    )


def _every_reader(directory: Path, split: str = "train"):
    """The same refusal from each consumer of the reader (the loader, ``data verify``, ``open_split``)."""
    return [
        lambda: open_split(directory, split),
        lambda: TokenSplit(directory, split),
        lambda: verify_shards(directory, [split]),
    ]


def _fails_everywhere(directory: Path, match: str, split: str = "train") -> None:
    for read in _every_reader(directory, split):
        with pytest.raises(MobiLlamaError, match=match):
            read()


def test_reads_what_was_written(shards):
    manifest, arrays = read_split(shards, "train")
    assert [a.shape for a in arrays] == [(5, 9), (3, 9)] and manifest["sample_len"] == 9
    assert np.array_equal(arrays[1], _rows(3, 1)) and isinstance(arrays[0], np.memmap)
    assert arrays[0].dtype == SHARD_DTYPES["uint16"] == shard_dtype(VOCAB)
    assert len(TokenSplit(shards, "train")) == 8 and verify_shards(shards) == manifest


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.update(format_version=2), "version 2 is not 'mobillama-token-shards' version 1"),
        (lambda m: m.update(format="other"), "format 'other' version 1 is not"),
        (lambda m: m.pop("sample_len"), "missing key 'sample_len'"),
        (lambda m: m.update(sample_len=12), "sample_len 12 is not seq_len \\+ 1"),
        (lambda m: m.update(dtype="int8"), "dtype 'int8' is not one of uint16, uint32"),
        (
            lambda m: m["splits"]["train"].update(num_samples=9),
            "train split lists 9 samples, its shards hold 8",
        ),
    ],
)
def test_manifest_checks(shards, edit, match):
    edit_manifest(shards, edit)
    _fails_everywhere(shards, match)


def test_hash_mismatch(shards):
    shard = shards / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[4] ^= 0x01
    shard.write_bytes(bytes(data))
    _fails_everywhere(shards, "train-00001.bin: sha256 .* does not match the manifest")
    assert len(open_split(shards, "train", verify=False)) == 2  # the opt-out skips the read of the data
    edit_manifest(shards, lambda m: m["splits"]["train"]["shards"][1].pop("sha256"))
    _fails_everywhere(shards, "train-00001.bin: the manifest records no sha256")


def test_truncated_shard_and_wrong_row_count(shards):
    shard = shards / "train-00000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    _fails_everywhere(shards, "train-00000.bin: .* not a whole number of 9-token rows")
    with pytest.raises(MobiLlamaError, match="truncated or modified"):
        open_split(shards, "train", verify=False)  # sizes are checked even without hashing
    shard.write_bytes(data[: -9 * 2])  # one whole row short
    _fails_everywhere(shards, "train-00000.bin: 4 rows, the manifest says 5")
    shard.unlink()
    _fails_everywhere(shards, "train-00000.bin: shard listed in the manifest is missing")


def test_token_id_beyond_the_vocabulary(tmp_path):
    rows = _rows(4)
    rows[2, 3] = VOCAB  # one past the last id
    d = write_token_shards(tmp_path / "d", {"train": [rows]}, vocab_size=VOCAB)
    _fails_everywhere(d, f"train-00000.bin: token id {VOCAB} >= the manifest's vocab_size {VOCAB}")


def test_unknown_split_and_missing_directory(shards, tmp_path):
    _fails_everywhere(shards, "no 'test' split \\(splits: train, val\\)", split="test")
    _fails_everywhere(tmp_path / "nowhere", "data directory not found")


def test_uint32_and_empty_shards(tmp_path):
    rows = _rows(3)
    rows[0, 0] = 70000
    d = write_token_shards(tmp_path / "d", {"train": [rows, rows[:0]]}, vocab_size=70001, dtype="uint32")
    arrays = open_split(d, "train")
    assert arrays[0].dtype == SHARD_DTYPES["uint32"] == shard_dtype(70001) and arrays[0][0, 0] == 70000
    assert arrays[1].shape == (0, 9) and len(TokenSplit(d, "train")) == 3
