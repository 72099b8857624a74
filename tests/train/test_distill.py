"""Healing by distillation (``mobillama pretrain --distill-from TEACHER [--train-only ffn]``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mobillama.checkpoint import load_checkpoint, save_checkpoint
from mobillama.cli import main
from mobillama.config import get_preset
from mobillama.model import MobiLlama
from mobillama.train.distill import distill_loss_sum, summed_kl
from mobillama.train.loop import lm_loss_sum
from mobillama.train.metrics import read_metrics
from mobillama.train.state import read_index


def test_summed_kl_equals_a_hand_computed_kl_with_temperature():
    student = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]]])
    teacher = torch.tensor([[[0.5, 1.0, 1.5], [1.0, 0.0, -1.0], [9.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, 0, -100]])  # the third position has no target: left out
    T = 2.0

    def softmax(row):
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    expected = 0.0
    for pos in (0, 1):
        p = softmax(teacher[0, pos].tolist())
        q = softmax(student[0, pos].tolist())
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    expected *= T**2
    assert float(summed_kl(student, teacher, labels, T)) == pytest.approx(expected, rel=1e-6)
    assert float(summed_kl(teacher, teacher, labels, T)) == pytest.approx(0.0, abs=1e-6)


def test_distill_loss_mixes_kl_and_cross_entropy():
    torch.manual_seed(0)
    config = get_preset("micro")
    student, teacher = MobiLlama(config).eval(), MobiLlama(config).eval()
    batch = {"input_ids": torch.randint(3, 256, (2, 9)), "labels": torch.randint(3, 256, (2, 9))}
    batch["labels"][0, :3] = -100
    with torch.no_grad():
        ce = lm_loss_sum(student, batch)
        kl = summed_kl(student(batch["input_ids"]), teacher(batch["input_ids"]), batch["labels"], 1.5)
        mixed = distill_loss_sum(student, batch, teacher=teacher, temperature=1.5, alpha=0.25)
        only_ce = distill_loss_sum(student, batch, teacher=teacher, temperature=1.5, alpha=0.0)
    assert float(kl) > 0
    assert float(mixed) == pytest.approx(0.25 * float(kl) + 0.75 * float(ce), rel=1e-5)
    assert float(only_ce) == pytest.approx(float(ce), rel=1e-6)


@pytest.fixture
def teacher_and_student(tmp_path):
    torch.manual_seed(0)
    config = get_preset("micro").replace(ffn_sharing="none")
    teacher = save_checkpoint(MobiLlama(config), config, tmp_path / "teacher")
    student = tmp_path / "student"
    args = [
        "share",
        "--from",
        str(teacher),
        "--strategy",
        "aligned",
        "--sharing",
        "group:2",
        "--out",
        str(student),
    ]
    assert main(args) == 0
    return teacher, student


def heal_args(helpers, shard_dir, tmp_path, name, teacher, student, *extra):
    recipe = helpers.micro_recipe(shard_dir, tmp_path / name, train={"max_steps": 6})
    path = helpers.write_recipe(tmp_path / f"{name}.yaml", recipe)
    return [
        "pretrain",
        "--recipe",
        str(path),
        "--init-from",
        str(student),
        "--distill-from",
        str(teacher),
        "--train-only",
        "ffn",
        "--distill.temperature=2",
        "--distill.alpha=0.7",
        *extra,
    ]


def test_healing_run_trains_only_ffns_records_the_teacher_and_resumes_bitwise(
    helpers, shard_dir, tmp_path, teacher_and_student
):
    teacher, student = teacher_and_student
    full = tmp_path / "full"
    assert main(heal_args(helpers, shard_dir, tmp_path, "full", teacher, student)) == 0
    run = json.loads((full / "run.json").read_text())
    assert run["distill"]["teacher"] == str(teacher) and run["distill"]["alpha"] == 0.7
    assert len(run["distill"]["teacher_model_sha256"]) == 64 and run["train_only"] == "ffn"

    _, before = load_checkpoint(student)
    _, after = load_checkpoint(full / "checkpoints" / "step-00000006")
    ffn = "model.ffns.0.up_proj.weight"
    assert not torch.equal(before[ffn], after[ffn])
    for name in before:
        if not name.startswith("model.ffns."):
            assert torch.equal(before[name], after[name]), name

    # continue from the full run's step-2 checkpoint in a new run directory: the same steps 3..6, bitwise
    resumed = tmp_path / "resumed"
    step2 = full / "checkpoints" / "step-00000002"
    assert (
        main([*heal_args(helpers, shard_dir, tmp_path, "resumed", teacher, student), "--resume", str(step2)])
        == 0
    )
    losses = lambda r: {m["step"]: m["loss"] for m in read_metrics(r) if "loss" in m}  # noqa: E731
    vals = lambda r: {m["step"]: m["val_loss"] for m in read_metrics(r) if "val_loss" in m}  # noqa: E731
    assert losses(resumed) == {s: v for s, v in losses(full).items() if s > 2} and len(losses(resumed)) == 4
    assert vals(resumed) == {s: v for s, v in vals(full).items() if s > 2}
    assert read_index(resumed)[-1]["model_sha256"] == read_index(full)[-1]["model_sha256"]
    opt = [
        (r / "checkpoints" / "step-00000006" / "optimizer.safetensors").read_bytes() for r in (full, resumed)
    ]
    assert opt[0] == opt[1]


def test_distillation_changes_the_loss_and_validates_on_plain_cross_entropy(
    helpers, shard_dir, tmp_path, teacher_and_student
):
    teacher, student = teacher_and_student
    recipe = helpers.write_recipe(
        tmp_path / "r.yaml",
        helpers.micro_recipe(
            shard_dir, tmp_path / "plain", train={"max_steps": 3}, optim={"lr": 0, "min_lr": 0}
        ),
    )  # lr 0: the weights stay the student's, so both runs' validation loss is the student's CE
    assert main(["pretrain", "--recipe", str(recipe), "--init-from", str(student)]) == 0
    args = ["pretrain", "--recipe", str(recipe), "--init-from", str(student), "--out", str(tmp_path / "kd")]
    assert main([*args, "--distill-from", str(teacher), "--distill.alpha=1"]) == 0
    plain, kd = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "kd")
    first = lambda ms, key: next(m[key] for m in ms if key in m)  # noqa: E731
    assert first(plain, "loss") != pytest.approx(first(kd, "loss"), rel=1e-3)  # KL, not CE, at alpha 1
    assert first(plain, "val_loss") == pytest.approx(first(kd, "val_loss"), rel=1e-6)


def test_bad_teacher_is_a_one_line_error(helpers, shard_dir, tmp_path, teacher_and_student, capsys):
    _, student = teacher_and_student
    wide = get_preset("micro").replace(ffn_sharing="none", vocab_size=512)
    other = save_checkpoint(MobiLlama(wide), wide, tmp_path / "wide")
    recipe = helpers.write_recipe(tmp_path / "r.yaml", helpers.micro_recipe(shard_dir, tmp_path / "run"))
    base = ["pretrain", "--recipe", str(recipe), "--init-from", str(student)]
    assert main([*base, "--distill-from", str(other)]) == 2
    err = capsys.readouterr().err
    assert "teacher's vocabulary has 512 tokens, the student's 256" in err and err.count("\n") == 1
    assert main([*base, "--distill-from", str(tmp_path / "nope")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert main([*base, "--distill-from", str(other), "--distill.alpha=2"]) == 2
    assert "'distill.alpha' must be in [0, 1]" in capsys.readouterr().err
    assert main([*base, "--model.train_only=attention"]) == 2
    assert "'model.train_only' must be one of all, ffn" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
