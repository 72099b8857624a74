"""Checkpoints: HF-loadable, hashed, indexed, retained, atomic under kill and full disk, verified on resume."""

from __future__ import annotations

import errno
import json
import os
import signal
import time

import pytest
import torch

from mobillama.errors import MobiLlamaError
from mobillama.train.metrics import read_metrics
from mobillama.train.pretrain import run_pretrain
from mobillama.train.recipe import recipe_from_dict
from mobillama.train.state import list_checkpoints, read_index, verify_checkpoint


def _recipe(helpers, shard_dir, run, **sections):
    return recipe_from_dict(helpers.micro_recipe(shard_dir, run, **sections))


def test_checkpoint_is_a_loadable_hf_model_with_lineage(helpers, shard_dir, tmp_path):
    from mobillama.hf import MobiLlamaForCausalLM

    run = tmp_path / "run"
    summary = run_pretrain(_recipe(helpers, shard_dir, run, train={"max_steps": 4}))
    assert summary["step"] == 4 and summary["loss"] < 5.6  # started near ln(256) = 5.55
    final = list_checkpoints(run)[-1]
    assert final.name == "step-00000004" and verify_checkpoint(final) is None
    hf = MobiLlamaForCausalLM.from_pretrained(final).eval()
    ids = torch.randint(3, 256, (1, 8))
    from mobillama.checkpoint import load_model

    torch.testing.assert_close(hf(ids).logits, load_model(final)(ids))
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["loader"] == {"epoch": 0, "position": 32, "seed": 7}
    assert state["tokens_seen"] == 4 * 128 and state["scheduler"]["step"] == 4
    assert state["recipe"]["optim"]["lr"] == 3e-3 and "code_version" in state
    assert set(state["files"]) >= {
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "config.json",
    }
    index = read_index(run)
    assert [e["step"] for e in index] == [2, 4] and index[-1]["position"] == 32
    assert (run / "checkpoints.csv").read_text().splitlines()[0].startswith("step,tokens,loss,epoch,position")
    assert (run / "recipe.yaml").is_file() and json.loads((run / "run.json").read_text())["grad_accum"] == 2
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
    assert sum("val_loss" in r for r in read_metrics(run)) == 2  # steps 3 and 4 (the end)


def test_retention_keeps_last_k_and_every_mth(helpers, shard_dir, tmp_path):
    run = tmp_path / "run"
    recipe = _recipe(
        helpers,
        shard_dir,
        run,
        train={"max_steps": 7},
        checkpoint={"every_steps": 1, "keep_last": 2, "keep_every_steps": 3},
    )
    run_pretrain(recipe)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000003", "step-00000006", "step-00000007"]
    index = read_index(run)
    assert [(e["step"], e["kept"]) for e in index] == [
        (1, False), (2, False), (3, True), (4, False), (5, False), (6, True), (7, True)
    ]  # fmt: skip


def test_full_disk_while_saving_gives_clear_error_and_keeps_previous(
    helpers, shard_dir, tmp_path, monkeypatch
):
    import mobillama.train.state as state_mod

    real = state_mod.save_file

    def failing(tensors, path, *args, **kwargs):
        if "step-00000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(state_mod, "save_file", failing)
    run = tmp_path / "run"
    with pytest.raises(
        MobiLlamaError, match=r"no space left on device; the previous checkpoint .*step-00000002 is intact"
    ):
        run_pretrain(_recipe(helpers, shard_dir, run))
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002"]
    assert verify_checkpoint(run / "checkpoints" / "step-00000002") is None
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp left


def test_corrupt_checkpoint_falls_back_to_previous_valid_one(helpers, shard_dir, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = _recipe(helpers, shard_dir, run)
    run_pretrain(recipe)
    before = [r["loss"] for r in read_metrics(run) if "loss" in r]
    newest = run / "checkpoints" / "step-00000006"
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert verify_checkpoint(newest) == "sha256 mismatch in model.safetensors"
    capsys.readouterr()
    summary = run_pretrain(recipe, resume="auto")
    out = capsys.readouterr().out
    assert "step-00000006 is invalid (sha256 mismatch in model.safetensors); falling back" in out
    assert "resumed from" in out and "step-00000004" in out
    assert summary["step"] == 6 and verify_checkpoint(newest) is None  # redone and rewritten
    assert [r["loss"] for r in read_metrics(run) if "loss" in r] == before  # bitwise the same losses
    with pytest.raises(MobiLlamaError, match="cannot resume from .*sha256 mismatch"):
        (run / "checkpoints" / "step-00000002" / "rng.safetensors").write_bytes(b"junk")
        run_pretrain(recipe, resume=str(run / "checkpoints" / "step-00000002"))


def test_existing_run_needs_resume_flag(helpers, shard_dir, tmp_path):
    recipe = _recipe(helpers, shard_dir, tmp_path / "run", train={"max_steps": 2})
    run_pretrain(recipe)
    with pytest.raises(MobiLlamaError, match="already holds checkpoints; pass --resume auto"):
        run_pretrain(recipe)


def test_kill_during_save_leaves_previous_checkpoint_loadable(helpers, shard_dir, tmp_path):
    """SIGKILL while step 4's checkpoint is half-written: step 2 stays the newest valid one."""
    run = tmp_path / "run"
    recipe = helpers.write_recipe(tmp_path / "r.yaml", helpers.micro_recipe(shard_dir, run))
    marker = tmp_path / "saving"
    prelude = f"""
import time, pathlib, mobillama.train.state as s
real = s.save_file
def slow(tensors, path, *a, **k):
    real(tensors, path, *a, **k)
    if "step-00000004" in str(path):
        pathlib.Path({str(marker)!r}).touch()
        time.sleep(120)
s.save_file = slow
"""
    proc = helpers.run_cli(["pretrain", "--recipe", str(recipe)], prelude=prelude)
    deadline = time.time() + 90
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "the run never reached the step-4 save"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    names = [p.name for p in (run / "checkpoints").iterdir()]
    assert "step-00000002" in names and "step-00000004" not in names
    assert any(n.startswith(".step-00000004") for n in names)  # the half-written temp directory
    assert verify_checkpoint(run / "checkpoints" / "step-00000002") is None
    from mobillama.checkpoint import load_model

    load_model(run / "checkpoints" / "step-00000002")
    summary = run_pretrain(recipe_from_dict(helpers.micro_recipe(shard_dir, run)), resume="auto")
    assert summary["step"] == 6
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())  # temp cleaned up
