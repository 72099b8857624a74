"""Exact resume: a run SIGKILLed mid-way and resumed equals an uninterrupted run, bitwise (CPU fp32)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from mobillama.train.metrics import read_metrics
from mobillama.train.state import read_index


def _losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def test_sigkill_then_resume_is_bitwise_identical(helpers, shard_dir, tmp_path):
    steps = 24
    sections = {"train": {"max_steps": steps}, "checkpoint": {"every_steps": 5, "keep_last": 3}}
    runs = {}
    for name in ("full", "killed"):
        recipe = helpers.micro_recipe(shard_dir, tmp_path / name, **sections)
        runs[name] = helpers.write_recipe(tmp_path / f"{name}.yaml", recipe)
    full = helpers.run_cli(["pretrain", "--recipe", str(runs["full"])], stdout=subprocess.DEVNULL)
    killed = helpers.run_cli(["pretrain", "--recipe", str(runs["killed"])], stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(_losses(tmp_path / "killed")) < 12 and time.time() < deadline and killed.poll() is None:
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    seen = max(_losses(tmp_path / "killed"))
    assert seen < steps, "the run finished before it could be killed"
    resumed = helpers.run_cli(
        ["pretrain", "--recipe", str(runs["killed"]), "--resume", "auto"], stdout=subprocess.PIPE, text=True
    )
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0 and full.wait(timeout=180) == 0
    assert "resumed from" in out
    assert _losses(tmp_path / "killed") == _losses(
        tmp_path / "full"
    )  # every step, bitwise (JSON floats round-trip)
    val = lambda run: [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]  # noqa: E731
    assert val(tmp_path / "killed") == val(tmp_path / "full")
    final = {name: read_index(tmp_path / name)[-1] for name in ("full", "killed")}
    assert final["full"]["step"] == final["killed"]["step"] == steps
    assert final["full"]["model_sha256"] == final["killed"]["model_sha256"]  # identical final weights
    opt = [
        (tmp_path / n / "checkpoints" / f"step-{steps:08d}" / "optimizer.safetensors").read_bytes()
        for n in ("full", "killed")
    ]
    assert opt[0] == opt[1]
