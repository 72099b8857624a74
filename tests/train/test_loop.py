"""The training loop's arithmetic: lr schedule, accumulation, shared-FFN gradients, weight-decay groups."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from mobillama.config import get_preset
from mobillama.data.loader import StepBatches, TokenSplit
from mobillama.model import MobiLlama
from mobillama.train.distributed import DistContext
from mobillama.train.loop import (
    Trainer,
    build_optimizer,
    compile_for_training,
    decay_category,
    lm_loss_sum,
    lr_at,
    param_groups,
)
from mobillama.train.metrics import read_metrics
from mobillama.train.pretrain import run_pretrain
from mobillama.train.recipe import OptimSection, recipe_from_dict


def test_lr_schedule_values():
    o = OptimSection(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(0, o, 110) == pytest.approx(1e-4)  # first update: lr / warmup
    assert lr_at(4, o, 110) == pytest.approx(5e-4)
    assert lr_at(9, o, 110) == pytest.approx(1e-3)  # end of warmup: peak
    assert lr_at(10, o, 110) == pytest.approx(1e-3)
    assert lr_at(60, o, 110) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half-way: midpoint of the cosine
    assert lr_at(35, o, 110) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, o, 110) == pytest.approx(1e-4) and lr_at(500, o, 110) == pytest.approx(1e-4)
    flat = OptimSection(lr=1e-3, min_lr=1e-4, warmup_steps=0, schedule="constant")
    assert lr_at(0, flat, 10) == lr_at(99, flat, 10) == 1e-3
    paper = OptimSection()  # 2000 warmup steps, 3e-4 -> 3e-5
    assert lr_at(1999, paper, 300187) == pytest.approx(3e-4) and lr_at(
        300187, paper, 300187
    ) == pytest.approx(3e-5)


def test_no_weight_decay_on_norms_only_by_default():
    model = MobiLlama(get_preset("micro"))
    decay, no_decay = param_groups(model, OptimSection())
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n, p in model.named_parameters() if decay_category(n, p) == "norms"
    }
    assert all("norm" in names[id(p)] for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert any("embed_tokens" in names[id(p)] for p in decay["params"]) and decay["weight_decay"] == 0.1
    _, no_decay = param_groups(model, OptimSection(no_decay=["norms", "embeddings", "lm_head"]))
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= {names[id(p)] for p in no_decay["params"]}


def _trainer(shard_dir, micro, accum, tmp_path):
    recipe = recipe_from_dict(
        {
            "model": {"preset": "micro"},
            "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
            "batch": {"global_batch_tokens": 128, "micro_batch_size": micro},
            "train": {"max_steps": 3},
        }
    )
    torch.manual_seed(0)
    model = MobiLlama(recipe.model_config())
    batches = StepBatches(TokenSplit(shard_dir, "train"), micro_batch_size=micro, grad_accum=accum, seed=1)
    return Trainer(model, recipe, batches, ctx=DistContext(), run_dir=tmp_path)


def _capture_grads(trainer):
    """Record the gradients each optimizer step sees (before AdamW, which amplifies ~1e-9 noise in
    near-zero gradients into lr-sized steps, so weights are the wrong place to compare)."""
    seen = []
    step = trainer.optimizer.step

    def wrapped(*args, **kwargs):
        seen.append([p.grad.clone() for p in trainer.model.parameters()])
        return step(*args, **kwargs)

    trainer.optimizer.step = wrapped
    return seen


def test_grad_accumulation_equals_one_big_batch(shard_dir, tmp_path):
    """4 micro-batches of 2 samples and one batch of 8 samples give the same steps."""
    small = _trainer(shard_dir, micro=2, accum=4, tmp_path=tmp_path)
    big = _trainer(shard_dir, micro=8, accum=1, tmp_path=tmp_path)
    grads_small, grads_big = _capture_grads(small), _capture_grads(big)
    for _ in range(3):
        a, b = small.train_step(), big.train_step()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    names = [n for n, _ in small.model.named_parameters()]
    for name, g, h in zip(names, grads_small[0], grads_big[0]):  # same weights, so same gradient
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7, msg=name)
    assert small.tokens_seen == big.tokens_seen == 3 * 8 * 16


def test_masked_labels_are_normalised_over_all_micro_batches(tmp_path):
    """With -100 labels (SFT), accumulation still equals the global token mean, not a mean of means."""
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (4, 12))
    labels = ids.roll(-1, 1)
    labels[0, :10] = -100  # first sample has few targets
    model = MobiLlama(get_preset("micro"))
    with torch.no_grad():
        expected = lm_loss_sum(model, {"input_ids": ids, "labels": labels}) / (labels != -100).sum()

    class Source:
        def next_step(self):
            return [{"input_ids": ids[i : i + 1], "labels": labels[i : i + 1]} for i in range(4)]

    recipe = recipe_from_dict({"model": {"preset": "micro"}, "optim": {"grad_clip": 0.0}})
    trainer = Trainer(model, recipe, Source(), ctx=DistContext(), run_dir=tmp_path)
    assert trainer.train_step()["loss"] == pytest.approx(float(expected), rel=1e-6)


def test_shared_ffn_gradient_is_the_sum_of_per_layer_gradients():
    torch.manual_seed(0)
    shared = MobiLlama(get_preset("micro"))
    unshared = MobiLlama(get_preset("micro").replace(ffn_sharing="none"))
    state = {k: v for k, v in shared.state_dict().items() if not k.startswith("model.ffns.")}
    for i in range(4):
        state.update(
            {k.replace("ffns.0.", f"ffns.{i}."): v for k, v in shared.state_dict().items() if "ffns.0." in k}
        )
    unshared.load_state_dict(state)
    ids = torch.randint(3, 256, (2, 12))
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1)}
    lm_loss_sum(shared, batch).backward()
    lm_loss_sum(unshared, batch).backward()
    for w in ("gate_proj", "up_proj", "down_proj"):
        total = sum(getattr(unshared.model.ffns[i], w).weight.grad for i in range(4))
        torch.testing.assert_close(getattr(shared.model.ffns[0], w).weight.grad, total, rtol=1e-5, atol=1e-7)
    # and every non-FFN gradient is the same in both models
    torch.testing.assert_close(shared.model.embed_tokens.weight.grad, unshared.model.embed_tokens.weight.grad)


def test_activation_checkpointing_and_bf16_autocast(shard_dir, tmp_path):
    plain = _trainer(shard_dir, micro=4, accum=2, tmp_path=tmp_path)
    ckpt = _trainer(shard_dir, micro=4, accum=2, tmp_path=tmp_path)
    ckpt.model.model.gradient_checkpointing = True
    for _ in range(2):
        assert ckpt.train_step()["loss"] == pytest.approx(plain.train_step()["loss"], rel=1e-6)
    bf16 = _trainer(shard_dir, micro=4, accum=2, tmp_path=tmp_path)
    bf16.recipe.train.precision = "bf16"
    bf16.autocast_dtype = torch.bfloat16
    fp32 = _trainer(shard_dir, micro=4, accum=2, tmp_path=tmp_path)
    a, b = bf16.train_step(), fp32.train_step()
    assert a["loss"] == pytest.approx(b["loss"], rel=2e-2) and a["loss"] != b["loss"]  # bf16 matmuls ran
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # master weights stay fp32


def test_optimizer_is_fused_adamw_with_the_foreach_update():
    """Plain parameters get PyTorch's fused AdamW; its steps equal the foreach implementation's."""
    torch.manual_seed(0)
    model = MobiLlama(get_preset("micro"))
    twin = copy.deepcopy(model)
    optim = OptimSection(lr=1e-2)
    fused = build_optimizer(model, optim)
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    reference = torch.optim.AdamW(
        param_groups(twin, optim), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, foreach=True
    )
    ids = torch.randint(3, 256, (2, 12))
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1)}
    for _ in range(3):
        for net, opt in ((model, fused), (twin, reference)):
            opt.zero_grad()
            lm_loss_sum(net, batch).backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(model.lm_head.weight, MobiLlama(get_preset("micro")).lm_head.weight)


def test_compile_for_training_compiles_layers_and_loss_and_trains_alike(helpers, shard_dir, tmp_path):
    """Recipe key model.compile: the same losses as eager (fp32), same parameter names."""
    torch.manual_seed(0)
    model = MobiLlama(get_preset("micro"))
    names = [n for n, _ in model.named_parameters()]
    ids = torch.randint(3, 256, (2, 12))
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1)}
    with torch.no_grad():
        eager = lm_loss_sum(model, batch)
    cross_entropy = compile_for_training(model)
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints keep their keys
    with torch.no_grad():
        compiled = functools.partial(lm_loss_sum, cross_entropy=cross_entropy)(model, batch)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)

    losses = {}
    for compile_, checkpointing in ((False, False), (True, False), (True, True)):
        run = tmp_path / f"compile-{compile_}-{checkpointing}"
        recipe = helpers.micro_recipe(
            shard_dir,
            run,
            model={"compile": compile_, "gradient_checkpointing": checkpointing},
            train={"max_steps": 3},
            checkpoint={"every_steps": 3},
        )
        run_pretrain(recipe_from_dict(recipe), say=lambda _msg: None)
        losses[compile_, checkpointing] = [r["loss"] for r in read_metrics(run) if "loss" in r]
    eager = losses[False, False]
    assert len(eager) == 3
    assert losses[True, False] == pytest.approx(eager, rel=1e-4)
    assert losses[True, True] == pytest.approx(eager, rel=1e-4)  # compiled layers under checkpointing
