"""Deterministic, resumable, rank-aware batches streamed from token shards.

Reads the shard format of ``mobillama data prepare`` through :mod:`mobillama.data.shards`: ``manifest.json`` plus raw
little-endian memmaps with one packed sample of ``seq_len + 1`` tokens per row (Amber's 2049 layout).
Only the rows of the current batch are read, so the corpus never has to fit in RAM.

Order. Epoch ``e`` visits the samples in the permutation ``default_rng([seed, e]).permutation(N)``. Each
optimizer step consumes the next ``samples_per_step`` entries of that permutation (the global batch);
a partial global batch at the end of an epoch is skipped and the next epoch starts. Rank ``r`` of ``W``
takes its own contiguous slice of the global batch, so ranks are disjoint and together see exactly what a
single process would. The whole position is ``(epoch, position, seed)``: resuming from it, at any world
size with the same global batch, neither repeats nor skips a sample.

Why not ``torch.utils.data.DataLoader`` + ``DistributedSampler``: its position is not restorable mid-epoch
and its per-rank split depends on the world size, which breaks exact resume and world-size changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobillama.data.shards import read_split
from mobillama.errors import MobiLlamaError


class TokenSplit:
    """One split of a shard directory as a random-access sequence of ``seq_len + 1``-token rows.

    The shards are opened (and, with ``verify``, hashed) by :func:`mobillama.data.shards.read_split`,
    the one reader with the format's checks.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", *, verify: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.manifest, shards = read_split(self.data_dir, split, verify=verify)
        self.split = split
        self.seq_len = int(self.manifest["seq_len"])
        self.sample_len = int(self.manifest["sample_len"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.shards: list[np.ndarray] = [s for s in shards if len(s)]
        self.offsets = np.cumsum([0] + [s.shape[0] for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.shards[shard][index - self.offsets[shard]]

    def rows(self, indices: Sequence[int]) -> np.ndarray:
        """The rows at ``indices`` as one int64 array [len(indices), sample_len] (copied out of the memmap)."""
        return np.stack([self[int(i)] for i in indices]).astype(np.int64)


def check_vocab(split: TokenSplit, model_vocab_size: int) -> None:
    """Data tokenized with another vocabulary would train on garbage ids: refuse it."""
    if split.vocab_size != model_vocab_size:
        raise MobiLlamaError(
            f"{split.data_dir}: the data was tokenized with vocab_size {split.vocab_size} but the model has "
            f"vocab_size {model_vocab_size} (different tokenizer? set model.overrides.vocab_size)"
        )


@dataclass
class LoaderState:
    epoch: int = 0
    position: int = 0
    seed: int = 0


def lm_collate(rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Amber layout: inputs are row[:-1], labels (already shifted: the target of each position) row[1:]."""
    tensor = torch.from_numpy(rows)
    return {"input_ids": tensor[:, :-1].contiguous(), "labels": tensor[:, 1:].contiguous()}


class StepBatches:
    """Batch source for the training loop: each ``next_step()`` is this rank's micro-batches of one step.

    ``dataset`` is anything with ``len()`` and ``rows(indices)`` (or ``__getitem__``); ``collate`` turns
    the rows into the batch dict the loss function expects. SFT and vision reuse this with their own
    dataset and collate function.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        micro_batch_size: int,
        grad_accum: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        collate: Callable[[Any], dict[str, torch.Tensor]] = lm_collate,
    ) -> None:
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.collate = collate
        self.state = LoaderState(seed=seed)
        self.samples_per_step = micro_batch_size * grad_accum * world_size
        if len(dataset) < self.samples_per_step:
            raise MobiLlamaError(
                f"the data has {len(dataset)} samples, fewer than one global batch ({self.samples_per_step})"
            )
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.state.seed, epoch]).permutation(len(self.dataset))
            self._perm_epoch = epoch
        return self._perm

    def step_indices(self) -> list[list[int]]:
        """Advance one step; return this rank's sample indices per micro-batch."""
        if self.state.position + self.samples_per_step > len(self.dataset):
            self.state.epoch += 1
            self.state.position = 0
        perm = self._permutation(self.state.epoch)
        start = self.state.position + self.rank * self.micro_batch_size * self.grad_accum
        mine = perm[start : start + self.micro_batch_size * self.grad_accum]
        self.state.position += self.samples_per_step
        return [
            mine[i * self.micro_batch_size : (i + 1) * self.micro_batch_size].tolist()
            for i in range(self.grad_accum)
        ]

    def _fetch(self, indices: list[int]) -> Any:
        if hasattr(self.dataset, "rows"):
            return self.dataset.rows(indices)
        return [self.dataset[i] for i in indices]

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        return [self.collate(self._fetch(ix)) for ix in self.step_indices()]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "position": self.state.position, "seed": self.state.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = LoaderState(int(state["epoch"]), int(state["position"]), int(state["seed"]))


class ValidationBatches:
    """Fixed validation batches for this rank, re-iterable (every rank gets the same number of batches).

    With ``max_batches`` below the split's size the rows are a fixed random subset (drawn once from
    ``seed``), not the first rows: the head of a split is one document or one source file, so "the first
    64 rows" is not a sample of the split. ``rows``/``of_rows`` say what the validation loss is over, so
    the console, the metrics and the plot can name it."""

    def __init__(
        self,
        dataset: Any,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        max_batches: int = 0,
        collate=lm_collate,
        seed: int = 0,
    ):
        per_round = micro_batch_size * world_size
        rounds = len(dataset) // per_round
        if max_batches:
            rounds = min(rounds, max_batches)
        self.of_rows, self.rows = len(dataset), rounds * per_round
        order = np.arange(self.rows)
        if self.rows < self.of_rows:
            order = np.sort(np.random.default_rng(seed).choice(self.of_rows, self.rows, replace=False))
        self._ix = [
            [int(i) for i in order[r * per_round + rank * micro_batch_size :][:micro_batch_size]]
            for r in range(rounds)
        ]
        self.dataset, self.collate = dataset, collate

    @property
    def description(self) -> str:
        if self.rows == self.of_rows:
            return f"full validation split ({self.rows} rows)"
        return f"fixed random subset of {self.rows} of {self.of_rows} validation rows"

    def __call__(self):
        for ix in self._ix:
            rows = self.dataset.rows(ix) if hasattr(self.dataset, "rows") else [self.dataset[i] for i in ix]
            yield self.collate(rows)
