"""SFT on 2 gloo CPU processes (torchrun, DDP) equals the single-process run with the same global batch.

Full fine-tuning and LoRA: the same losses, validation losses and weights (fp32, rel. 1e-5), and a
DDP LoRA run resumes from its checkpoint in the same world size.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mobillama.sft.train import run_sft
from mobillama.train.metrics import read_metrics

SRC = str(Path(__file__).resolve().parents[2] / "src")
LORA = "r=4,alpha=8,dropout=0.0,targets=q_proj+v_proj+gate_proj+up_proj+down_proj"


@pytest.fixture(scope="module")
def data(instruction_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-data")
    for name, n in (("train", 32), ("heldout", 8)):
        lines = (instruction_set / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "mobillama", "sft", *args]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _metrics(run: Path) -> tuple[list[float], dict[int, float]]:
    rows = read_metrics(run)
    return [r["loss"] for r in rows if "loss" in r], {
        r["step"]: r["val_loss"] for r in rows if "val_loss" in r
    }


def _recipe(writer, tmp_path, base, data, name, *, accum):
    return writer(
        tmp_path / f"{name}.yaml",
        base,
        data / "train.jsonl",
        out_dir=tmp_path / name,
        val=data / "heldout.jsonl",
        batch={"micro_batch_size": 4, "grad_accum": accum},
        train={"max_steps": 3},
        eval={"every_steps": 1, "max_batches": 0},
        checkpoint={"every_steps": 1, "keep_last": 5},
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ddp_sft_equals_single_process(lora, base_checkpoint, data, sft_recipe_writer, tmp_path):
    from mobillama.sft.recipe import SFTRecipe, parse_lora_spec
    from mobillama.train.recipe import load_recipe

    extra = ["--lora", LORA] if lora else []
    single = _recipe(sft_recipe_writer, tmp_path, base_checkpoint, data, "single", accum=2)
    run_sft(load_recipe(single, parse_lora_spec(LORA) if lora else [], cls=SFTRecipe), say=lambda _m: None)
    # 2 processes x 4 conversations x 1 micro-batch = 1 process x 4 x 2: the same 8 conversations per step
    ddp = _recipe(sft_recipe_writer, tmp_path, base_checkpoint, data, "ddp", accum=1)
    _torchrun(["--recipe", str(ddp), "--train.strategy=ddp", *extra])
    import json

    run_info = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run_info["world_size"] == 2 and run_info["strategy"] == "ddp"
    ref_loss, ref_val = _metrics(tmp_path / "single")
    loss, val = _metrics(tmp_path / "ddp")
    assert len(loss) == 3 and loss == pytest.approx(ref_loss, rel=1e-5)
    assert val == pytest.approx(ref_val, rel=1e-5) and len(val) == 3
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    step3 = Path("checkpoints") / "step-00000003" / weights
    reference, trained = load_file(tmp_path / "single" / step3), load_file(tmp_path / "ddp" / step3)
    assert reference.keys() == trained.keys()
    for k in reference:
        torch.testing.assert_close(trained[k], reference[k], rtol=1e-5, atol=1e-6)
    if lora:
        # resume the DDP run from step 2 in 2 processes: the same adapter as the uninterrupted run
        shutil.rmtree(tmp_path / "ddp" / "checkpoints" / "step-00000003")
        _torchrun(["--recipe", str(ddp), "--train.strategy=ddp", "--resume", "auto", *extra])
        redone = load_file(tmp_path / "ddp" / step3)
        for k in trained:
            assert torch.equal(trained[k], redone[k]), k
