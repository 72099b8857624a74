"""Step checkpoints of a vision run are MobiLlama-V directories: loadable by from_pretrained, resumable."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mobillama.errors import MobiLlamaError
from mobillama.train.distributed import DistContext
from mobillama.train.loop import Trainer
from mobillama.train.metrics import read_metrics
from mobillama.train.recipe import Recipe
from mobillama.train.state import find_resume_checkpoint, list_checkpoints, read_index, verify_checkpoint
from mobillama.vision.checkpoint import save_vision_checkpoint
from mobillama.vision.data import eval_batches
from mobillama.vision.model import MobiLlamaV
from mobillama.vision.train import build_stage, run_stage, set_stage

from .conftest import COLORS


def _recipe(run_dir, max_steps, every):
    recipe = Recipe(name="vision-ckpt-test", out_dir=str(run_dir))
    recipe.optim.lr, recipe.optim.min_lr, recipe.optim.warmup_steps = 1e-2, 1e-3, 1
    recipe.batch.micro_batch_size = 4
    recipe.train.max_steps, recipe.train.device = max_steps, "cpu"
    recipe.checkpoint.every_steps, recipe.checkpoint.keep_last = every, 10
    recipe.eval.every_steps = max_steps
    recipe.log.tensorboard, recipe.log.progress = False, False
    return recipe


def test_step_checkpoints_load_with_from_pretrained(tmp_path, tiny_model, tokenizer, shapes_dir):
    tokenizer.save_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    setup = build_stage(tiny_model, 1, shapes_dir / "captions.jsonl", tokenizer, micro_batch_size=4)
    set_stage(tiny_model, 2)  # projector and decoder train: both parts of the checkpoint change
    trainer = Trainer(
        tiny_model,
        _recipe(tmp_path / "run", max_steps=4, every=2),
        setup.batches,
        ctx=DistContext(),
        run_dir=tmp_path / "run",
        loss_fn=setup.loss_fn,
        tokenizer_dir=tmp_path / "tok",
        model_io=setup.model_io,
        say=lambda _msg: None,
    )
    in_memory = {}
    save = trainer.save

    def snapshot_then_save():
        in_memory[trainer.step] = copy.deepcopy(tiny_model).eval()
        return save()

    trainer.save = snapshot_then_save
    trainer.fit()
    ckpts = list_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ["step-00000002", "step-00000004"]
    batch = next(iter(eval_batches(setup.batches.examples[:4], setup.processor, setup.pad_id, 4)))
    outputs = []
    for path, step in zip(ckpts, (2, 4)):
        assert verify_checkpoint(path) is None
        assert (path / "vision_config.json").is_file() and (path / "tokenizer.json").is_file()
        loaded = MobiLlamaV.from_pretrained(path)
        expected = in_memory[step].state_dict()
        for name, tensor in loaded.state_dict().items():
            assert torch.equal(tensor, expected[name]), (step, name)
        with torch.no_grad():
            got = loaded(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
            want = in_memory[step](batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
        assert torch.equal(got, want)
        outputs.append(got)
    assert not torch.equal(outputs[0], outputs[1])  # the two checkpoints hold different steps
    index = read_index(tmp_path / "run")
    assert [e["step"] for e in index] == [2, 4]
    assert index[0]["model_sha256"] != index[1]["model_sha256"]


def _llava(shapes_dir):
    path = shapes_dir / "llava.json"
    path.write_text(
        json.dumps(
            [
                {
                    "id": i,
                    "image": f"{c}_{s}.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat is in the picture?"},
                        {"from": "gpt", "value": f"a {c} {s}"},
                    ],
                }
                for i, (c, s) in enumerate((c, s) for c in COLORS for s in ("circle", "square"))
            ]
        )
    )
    return path


class Killed(Exception):
    """Stands in for SIGKILL: the run stops between two steps, after its last checkpoint."""


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_from_vision_step_checkpoint_equals_uninterrupted_run(
    tmp_path, tiny_model, tokenizer, shapes_dir, monkeypatch, stage
):
    tokenizer.save_pretrained(tmp_path / "tok")
    tiny_model.save_pretrained(tmp_path / "v0", tokenizer_dir=tmp_path / "tok")
    data = shapes_dir / "captions.jsonl" if stage == 1 else _llava(shapes_dir)
    kw = dict(max_steps=5, micro_batch_size=2, device="cpu", val_fraction=0.25, checkpoint_every=2)
    quiet = dict(say=lambda _msg: None)
    full = run_stage(tmp_path / "v0", stage, data, tmp_path / "full", **kw, **quiet)

    train_step = Trainer.train_step

    def dies_after_step_3(self):
        out = train_step(self)
        if self.step == 3:
            raise Killed
        return out

    monkeypatch.setattr(Trainer, "train_step", dies_after_step_3)
    with pytest.raises(Killed):
        run_stage(tmp_path / "v0", stage, data, tmp_path / "killed", **kw, **quiet)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["step-00000002"]
    said = []
    resumed = run_stage(
        tmp_path / "v0", stage, data, tmp_path / "killed", **kw, resume="auto", say=said.append
    )
    assert any("resumed from" in line and "step-00000002" in line for line in said)
    assert resumed["step"] == full["step"] == 5
    a, b = MobiLlamaV.from_pretrained(full["checkpoint"]), MobiLlamaV.from_pretrained(resumed["checkpoint"])
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert resumed["val_loss"] == full["val_loss"]
    losses = {
        run: [r["loss"] for r in read_metrics(tmp_path / run) if "loss" in r] for run in ("full", "killed")
    }
    assert losses["killed"][-1] == losses["full"][-1]
    index = {run: read_index(tmp_path / run)[-1] for run in ("full", "killed")}
    assert index["full"]["model_sha256"] == index["killed"]["model_sha256"]
    final = tmp_path / "killed" / "checkpoints" / "step-00000005"
    assert MobiLlamaV.from_pretrained(final).state_dict().keys() == a.state_dict().keys()


def test_damaged_vision_step_checkpoint_falls_back_to_previous(tmp_path, tiny_model, tokenizer, shapes_dir):
    tokenizer.save_pretrained(tmp_path / "tok")
    tiny_model.save_pretrained(tmp_path / "v0", tokenizer_dir=tmp_path / "tok")
    kw = dict(max_steps=4, micro_batch_size=4, device="cpu", val_fraction=0.0, checkpoint_every=2)
    run_stage(tmp_path / "v0", 1, shapes_dir / "captions.jsonl", tmp_path / "run", **kw, say=lambda _m: None)
    last = list_checkpoints(tmp_path / "run")[-1]
    weights = last / "vision.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    assert verify_checkpoint(last) == "sha256 mismatch in vision.safetensors"
    said = []
    assert find_resume_checkpoint(tmp_path / "run", say=said.append).name == "step-00000002"
    assert "is invalid" in said[0]


def test_vision_writer_rejects_foreign_tensors(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict(), **{"lm_head.weight": torch.zeros(2)})
    with pytest.raises(MobiLlamaError, match="'lm_head.weight' is not part of a MobiLlama-V model"):
        save_vision_checkpoint(state, tiny_model.config, tiny_model.vision_config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_run_stage_rejects_bad_checkpoint_every(tmp_path, tiny_model, tokenizer, shapes_dir):
    tokenizer.save_pretrained(tmp_path / "tok")
    tiny_model.save_pretrained(tmp_path / "v0", tokenizer_dir=tmp_path / "tok")
    with pytest.raises(MobiLlamaError, match="checkpoint_every must be a positive number of steps, got 0"):
        run_stage(tmp_path / "v0", 1, shapes_dir / "captions.jsonl", tmp_path / "run", checkpoint_every=0)


def test_cli_checkpoint_every(tmp_path, tiny_model, tokenizer, shapes_dir, capsys):
    from mobillama.cli import main

    tokenizer.save_pretrained(tmp_path / "tok")
    tiny_model.save_pretrained(tmp_path / "v0", tokenizer_dir=tmp_path / "tok")
    args = [
        "vision",
        "train",
        str(tmp_path / "v0"),
        "--stage",
        "1",
        "--data",
        str(shapes_dir / "captions.jsonl"),
    ]
    args += ["--steps", "2", "--batch-size", "4", "--device", "cpu", "--val-fraction", "0"]
    assert main([*args, "--out", str(tmp_path / "bad"), "--checkpoint-every", "0"]) == 2
    assert "checkpoint_every must be a positive number of steps, got 0" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "run"), "--checkpoint-every", "1"]) == 0
    ckpts = list_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ["step-00000001", "step-00000002"]
    first, last = (MobiLlamaV.from_pretrained(p) for p in ckpts)
    final = MobiLlamaV.from_pretrained(tmp_path / "run" / "final")
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), final.state_dict().values()))
    assert not torch.equal(first.projector.layers[0].weight, last.projector.layers[0].weight)
