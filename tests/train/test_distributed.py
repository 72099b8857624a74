"""DDP and FSDP2 on 2 gloo CPU processes (launched by torchrun) equal the single-process run.

Also: the FSDP2 run's sharded (DCP) checkpoint resumes in a single process (a different world size), and
its consolidated model.safetensors is the same model as the single-process checkpoint.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from mobillama.train.metrics import read_metrics
from mobillama.train.pretrain import run_pretrain
from mobillama.train.recipe import recipe_from_dict

STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(helpers, recipe_path, strategy: str) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        "-m", "mobillama", "pretrain", "--recipe", str(recipe_path), f"--train.strategy={strategy}",
            ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=helpers.SRC, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(run):
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def test_ddp_and_fsdp2_equal_single_process(helpers, shard_dir, tmp_path):
    sections = {"train": {"max_steps": STEPS}, "checkpoint": {"every_steps": 2, "keep_last": 5}}
    single = run_pretrain(recipe_from_dict(helpers.micro_recipe(shard_dir, tmp_path / "single", **sections)))
    assert single["step"] == STEPS
    reference = _losses(tmp_path / "single")
    ref_val = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path / "single") if "val_loss" in r}
    for strategy in ("ddp", "fsdp2"):
        run = tmp_path / strategy
        recipe = helpers.write_recipe(
            tmp_path / f"{strategy}.yaml", helpers.micro_recipe(shard_dir, run, **sections)
        )
        _torchrun(helpers, recipe, strategy)
        assert _losses(run) == pytest.approx(reference, rel=1e-5), strategy
        val = {
            r["step"]: r["val_loss"] for r in read_metrics(run) if "val_loss" in r and r["step"] in ref_val
        }
        assert val and val == pytest.approx({k: ref_val[k] for k in val}, rel=1e-5)

    # FSDP2 wrote sharded DCP state plus a consolidated HF model
    fsdp_ckpt = tmp_path / "fsdp2" / "checkpoints" / "step-00000006"
    assert (fsdp_ckpt / "dcp").is_dir() and not (fsdp_ckpt / "optimizer.safetensors").exists()
    from mobillama.checkpoint import load_model
    from mobillama.data.loader import TokenSplit, lm_collate
    from mobillama.train.loop import lm_loss_sum

    exported = load_model(fsdp_ckpt)  # the consolidated export is exactly the model FSDP2 evaluated
    batch = lm_collate(TokenSplit(shard_dir, "val").rows(range(8)))
    with torch.no_grad():
        loss = float(lm_loss_sum(exported, batch)) / batch["labels"].numel()
    logged = [
        r["val_loss"] for r in read_metrics(tmp_path / "fsdp2") if r.get("step") == 6 and "val_loss" in r
    ]
    assert loss == pytest.approx(logged[0], rel=1e-5)

    # ... and resumes at world size 1, continuing the single-process curve
    shutil.rmtree(tmp_path / "fsdp2" / "checkpoints" / "step-00000006")
    resumed = recipe_from_dict(helpers.micro_recipe(shard_dir, tmp_path / "fsdp2", **sections))
    run_pretrain(resumed, resume="auto")
    assert _losses(tmp_path / "fsdp2") == pytest.approx(reference, rel=1e-5)
