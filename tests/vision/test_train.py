"""Training stages: exactly the right parameters receive gradients; stage 1 learns captions from images."""

from __future__ import annotations

import pytest
import torch

from mobillama.errors import MobiLlamaError
from mobillama.vision.data import eval_batches, load_caption_examples
from mobillama.vision.train import build_stage, mean_loss, set_stage, vision_loss_sum


def _grads_by_part(model, batch):
    model.zero_grad(set_to_none=True)
    vision_loss_sum(model, batch).backward()
    parts = {"encoder": set(), "projector": set(), "decoder": set()}
    for name, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            parts[name.split(".")[0]].add(name)
    return parts


@pytest.mark.parametrize(
    ("stage", "train_encoder", "expect"),
    [
        (1, False, {"projector"}),
        (2, False, {"projector", "decoder"}),
        (2, True, {"projector", "decoder", "encoder"}),
    ],
)
def test_gradients_reach_exactly_the_stage_parameters(
    tiny_model, shapes_dir, tokenizer, stage, train_encoder, expect
):
    setup = build_stage(tiny_model, 1, shapes_dir / "captions.jsonl", tokenizer, micro_batch_size=4)
    trainable = set_stage(tiny_model, stage, train_encoder=train_encoder)
    batch = setup.batches.next_step()[0]
    tiny_model.train()
    parts = _grads_by_part(tiny_model, batch)
    assert {k for k, v in parts.items() if v} == expect
    assert set().union(*parts.values()) <= set(trainable)
    for part in expect:  # every parameter of a trained part gets a gradient (decoder: the used rows)
        names = {n for n, _ in tiny_model.named_parameters() if n.startswith(part)}
        missing = names - parts[part]
        if part == "decoder":
            missing = {n for n in missing if "embed_tokens" not in n}
        if part == "encoder":  # the layers after the feature layer and the post-norm do not feed the features
            missing = {n for n in missing if "layers.1." not in n and "post_layernorm" not in n}
        assert not missing, missing
    with pytest.raises(MobiLlamaError, match="stage must be 1 or 2"):
        set_stage(tiny_model, 3)


def test_stage1_lowers_caption_loss(tiny_model, shapes_dir, tokenizer):
    """Plain optimizer steps on the projector only (a learnability check, not a trainer)."""
    torch.manual_seed(0)
    setup = build_stage(tiny_model, 1, shapes_dir / "captions.jsonl", tokenizer, micro_batch_size=8)
    examples = load_caption_examples(shapes_dir / "captions.jsonl", tokenizer)
    before = mean_loss(tiny_model, eval_batches(examples, setup.processor, setup.pad_id, 8))
    opt = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=3e-2)
    tiny_model.train()
    for _ in range(20):
        batch = setup.batches.next_step()[0]
        loss = vision_loss_sum(tiny_model, batch) / (batch["labels"] != -100).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mean_loss(tiny_model, eval_batches(examples, setup.processor, setup.pad_id, 8))
    assert after < before - 0.3, (before, after)


def test_build_stage_bad_input(tiny_model, shapes_dir, tokenizer):
    with pytest.raises(MobiLlamaError, match="no training samples left"):
        build_stage(tiny_model, 1, shapes_dir / "captions.jsonl", tokenizer, val_fraction=1.0)
