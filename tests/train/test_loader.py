"""The shard loader (issue 3's loader): deterministic, resumable, disjoint across ranks, streaming."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mobillama.data.loader import StepBatches, TokenSplit, ValidationBatches, check_vocab
from mobillama.errors import MobiLlamaError


def _row_ids(split: TokenSplit) -> dict[bytes, int]:
    return {split[i].tobytes(): i for i in range(len(split))}


def test_split_reads_rows_across_shards(shard_dir):
    split = TokenSplit(shard_dir, "train")
    assert len(split) == 64 and split.seq_len == 16
    assert isinstance(split.shards[0], np.memmap)  # streamed, not loaded
    raw = np.fromfile(shard_dir / "train-00001.bin", dtype=np.uint16).reshape(-1, 17)
    assert np.array_equal(split[40], raw[0]) and np.array_equal(split.rows([63])[0], raw[-1])
    batch = StepBatches(split, micro_batch_size=4, grad_accum=1).next_step()[0]
    assert batch["input_ids"].shape == (4, 16) and batch["labels"].shape == (4, 16)
    assert (batch["input_ids"][:, 1:] == batch["labels"][:, :-1]).all()  # labels are the shifted row


def test_uint32_shards(tmp_path, helpers):
    d = helpers.write_shards(tmp_path / "d", vocab_size=70000, dtype="uint32", splits={"train": [8]})
    split = TokenSplit(d, "train")
    assert split.rows([0]).max() < 70000 and len(split) == 8


def _run(split, steps, *, rank=0, world=1, accum=2, state=None):
    loader = StepBatches(split, micro_batch_size=2, grad_accum=accum, rank=rank, world_size=world, seed=5)
    if state:
        loader.load_state_dict(state)
    seen = [i for _ in range(steps) for ix in loader.step_indices() for i in ix]
    return seen, loader.state_dict()


def test_deterministic_and_epochs_cover_every_sample(shard_dir):
    split = TokenSplit(shard_dir, "train")
    a, _ = _run(split, 16)
    b, state = _run(split, 16)
    assert a == b
    assert sorted(a) == list(range(64))  # 16 steps x 4 samples = one epoch, each sample once
    more, state = _run(split, 1, state=state)
    assert state["epoch"] == 1 and more != a[:4]  # a new permutation for the next epoch


def test_ranks_are_disjoint_and_union_is_the_single_process_batch(shard_dir):
    split = TokenSplit(shard_dir, "train")
    single, _ = _run(split, 5, accum=2)
    r0, _ = _run(split, 5, rank=0, world=2, accum=1)
    r1, _ = _run(split, 5, rank=1, world=2, accum=1)
    assert not set(r0) & set(r1)
    for step in range(5):
        assert sorted(single[4 * step : 4 * step + 4]) == sorted(
            r0[2 * step : 2 * step + 2] + r1[2 * step : 2 * step + 2]
        )


@pytest.mark.parametrize("cut", [1, 7, 16, 23])
def test_interrupted_and_resumed_equals_uninterrupted(shard_dir, cut):
    """Across ranks too: the union of samples before and after the interruption is the same list."""
    split = TokenSplit(shard_dir, "train")
    for world in (1, 2):
        full = [_run(split, 30, rank=r, world=world, accum=2 // world)[0] for r in range(world)]
        resumed = []
        for r in range(world):
            before, state = _run(split, cut, rank=r, world=world, accum=2 // world)
            after, _ = _run(
                split, 30 - cut, rank=r, world=world, accum=2 // world, state=json.loads(json.dumps(state))
            )
            resumed.append(before + after)
        assert resumed == full


def test_eval_batches_are_fixed_and_rank_disjoint(shard_dir):
    split = TokenSplit(shard_dir, "val")
    r0 = [b["input_ids"] for b in ValidationBatches(split, 2, 0, 2)()]
    r1 = [b["input_ids"] for b in ValidationBatches(split, 2, 1, 2)()]
    assert len(r0) == len(r1) == 2
    assert not any((x == y).all() for x in r0 for y in r1)


def test_limited_validation_is_a_named_fixed_random_subset(shard_dir):
    """eval.max_batches picks a seeded random subset (not the split's first rows) and says so."""
    split = TokenSplit(shard_dir, "train")
    full = ValidationBatches(split, 2, 0, 1)
    assert full.rows == full.of_rows == len(split) and full.description.startswith("full validation split")
    sub = ValidationBatches(split, 2, 0, 1, max_batches=3, seed=5)
    assert sub.rows == 6 and sub.description == f"fixed random subset of 6 of {len(split)} validation rows"
    assert [b["input_ids"].shape for b in sub()] == [b["input_ids"].shape for b in full()][:3]

    tagged = [[i] * 4 for i in range(40)]  # row i holds i: which rows were picked is readable
    picked = ValidationBatches(tagged, 2, 0, 1, max_batches=3, seed=5, collate=list)
    rows = [r[0] for batch in picked() for r in batch]
    assert rows == sorted(rows) and rows != list(range(6)) and len(set(rows)) == 6
    assert rows == [r[0] for batch in picked() for r in batch]  # the same rows at every evaluation
    again = ValidationBatches(tagged, 2, 0, 1, max_batches=3, seed=6, collate=list)
    assert rows != [r[0] for batch in again() for r in batch]
    rank1 = ValidationBatches(tagged, 2, 1, 2, max_batches=3, seed=5, collate=list)
    rank0 = ValidationBatches(tagged, 2, 0, 2, max_batches=3, seed=5, collate=list)
    assert not {r[0] for b in rank0() for r in b} & {r[0] for b in rank1() for r in b}


def test_bad_data(tmp_path, shard_dir):
    with pytest.raises(MobiLlamaError, match="data directory not found"):
        TokenSplit(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MobiLlamaError, match="no manifest.json"):
        TokenSplit(tmp_path / "empty")
    with pytest.raises(MobiLlamaError, match="no 'test' split"):
        TokenSplit(shard_dir, "test")
    with pytest.raises(MobiLlamaError, match="vocab_size 256 but the model has vocab_size 2048"):
        check_vocab(TokenSplit(shard_dir), 2048)
    shard = shard_dir / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(MobiLlamaError, match="train-00000.bin: sha256 .* does not match the manifest"):
        TokenSplit(shard_dir, "train")
    shard.write_bytes(bytes(data[:-3]))
    with pytest.raises(MobiLlamaError, match="not a whole number of 17-token rows"):
        TokenSplit(shard_dir, "train", verify=False)
    with pytest.raises(MobiLlamaError, match="fewer than one global batch"):
        StepBatches(TokenSplit(shard_dir, "val"), micro_batch_size=4, grad_accum=4)
    (shard_dir / "manifest.json").write_text("{not json")
    with pytest.raises(MobiLlamaError, match="not valid JSON"):
        TokenSplit(shard_dir)
