"""Fixtures for the training tests: token-shard directories of learnable or random rows (written by
``fixtures.write_token_shards``, independent of ``mobillama data prepare``), and small recipe files for the
micro preset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fixtures import write_token_shards

SRC = str(Path(__file__).resolve().parents[2] / "src")


def write_shards(
    out: Path,
    *,
    seq_len: int = 16,
    vocab_size: int = 256,
    splits: dict[str, list[int]] | None = None,
    seed: int = 0,
    dtype: str = "uint16",
    pattern: bool = True,
) -> Path:
    """A shard directory; ``splits`` maps split name -> samples per shard.

    With ``pattern`` the tokens follow a learnable rule (next = previous + 1 mod 64 after a random start),
    so short runs visibly reduce the loss; otherwise they are uniform noise.
    """
    splits = splits or {"train": [40, 24], "val": [8]}
    rng = np.random.default_rng(seed)
    rows_by_split = {}
    for split, counts in splits.items():
        rows_by_split[split] = []
        for n in counts:
            if pattern:
                start = rng.integers(3, vocab_size, size=(n, 1))
                rows = 3 + (start - 3 + np.arange(seq_len + 1)[None, :]) % min(64, vocab_size - 3)
            else:
                rows = rng.integers(3, vocab_size, size=(n, seq_len + 1))
            rows_by_split[split].append(rows)
    return write_token_shards(out, rows_by_split, vocab_size=vocab_size, dtype=dtype)


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    return write_shards(tmp_path / "data")


def micro_recipe(data: Path, run: Path, **sections) -> dict:
    """A recipe dict for the micro preset: fp32 CPU, 16-token samples, short warmup."""
    recipe = {
        "name": "test",
        "out_dir": str(run),
        "model": {"preset": "micro"},
        "data": {"path": str(data), "seed": 7},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "batch": {"global_batch_tokens": 128, "micro_batch_size": 4},
        "train": {"max_steps": 6, "precision": "fp32", "device": "cpu", "seed": 3},
        "eval": {"every_steps": 3, "max_batches": 2},
        "checkpoint": {"every_steps": 2, "keep_last": 10},
        "log": {"every_steps": 1, "tensorboard": False, "progress": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(
    args: list[str], *, prelude: str = "", env_extra: dict | None = None, **popen
) -> subprocess.Popen:
    """Start ``mobillama ARGS`` in a fresh interpreter (optionally after some patching code)."""
    code = f"import sys\n{prelude}\nfrom mobillama.cli import main\nsys.exit(main({args!r}))\n"
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-c", code], env=env, **popen)


@pytest.fixture
def helpers():
    """The helpers above (pytest's importlib mode makes conftest not importable from test modules)."""
    import types

    return types.SimpleNamespace(
        write_shards=write_shards,
        micro_recipe=micro_recipe,
        write_recipe=write_recipe,
        run_cli=run_cli,
        SRC=SRC,
    )
