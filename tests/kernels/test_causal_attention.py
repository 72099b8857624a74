"""The CPU training attention kernel (forward and backward) against PyTorch's SDPA, as a custom operator
under autograd and torch.compile, and inside the model and the training loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mobillama import kernels
from mobillama.config import get_preset
from mobillama.kernels.causal_attention import causal_attention, enable_for_training
from mobillama.model import Attention, MobiLlama
from mobillama.train.distributed import DistContext
from mobillama.train.loop import Trainer, lm_loss_sum
from mobillama.train.recipe import recipe_from_dict

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason=f"CPU kernels cannot run here: {kernels.unavailable_reason()}"
)


def _qkv(B, H, T, D, dtype=torch.float32, layout="projection", seed=0):
    """q, k, v as [B, H, T, D]: transposed views of [B, T, H, D] (what the model passes) or contiguous."""
    g = torch.Generator().manual_seed(seed)
    if layout == "projection":
        return [torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2) for _ in range(3)]
    return [torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(3)]


def _sdpa_with_grads(q, k, v, dout):
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, is_causal=True)
    out.backward(dout.float())
    return out, [t.grad for t in leaves]


@needs_kernels
@pytest.mark.parametrize("layout", ["projection", "contiguous"])
@pytest.mark.parametrize(
    "B, H, T, D", [(1, 1, 1, 16), (2, 3, 5, 32), (2, 2, 37, 48), (1, 4, 64, 64), (1, 2, 130, 128)]
)
def test_forward_and_backward_equal_sdpa(B, H, T, D, layout):
    q, k, v = _qkv(B, H, T, D, layout=layout)
    dout = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1))
    out, lse = kernels.attention_train_forward(q, k, v)
    expected, grads = _sdpa_with_grads(q, k, v, dout)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    scores = (q @ k.transpose(-1, -2)) * D**-0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=1e-5, atol=1e-5)
    for got, want, name in zip(kernels.attention_train_backward(q, k, v, out, lse, dout), grads, "qkv"):
        assert got.shape == (B, H, T, D)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"d{name}")


@needs_kernels
def test_kernel_rejects_what_it_cannot_read():
    q, k, v = _qkv(1, 2, 8, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.attention_train_forward(*_qkv(1, 2, 8, 24))
    with pytest.raises(ValueError, match="share one"):
        kernels.attention_train_forward(q, k[:, :1], v)
    with pytest.raises(ValueError, match="fp32"):
        kernels.attention_train_forward(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match=r"\[B, H, T, D\]"):
        kernels.attention_train_forward(q[0], k[0], v[0])  # 3-d
    out, lse = kernels.attention_train_forward(q, k, v)
    with pytest.raises(ValueError, match="lse must be"):
        kernels.attention_train_backward(q, k, v, out, lse[:, :, :-1], out)
    with pytest.raises(ValueError, match="share one"):
        kernels.attention_train_backward(q, k, v, out, lse, out[:, :, :-1])
    with pytest.raises(ValueError, match="unit stride"):
        kernels.attention_train_forward(*(torch.randn(1, 2, 32, 8).transpose(-1, -2) for _ in range(3)))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_operator_under_autograd_and_compile(dtype):
    q, k, v = _qkv(2, 2, 19, 32, dtype)
    dout = torch.randn(2, 2, 19, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    expected, grads = _sdpa_with_grads(q, k, v, dout)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for fn in (causal_attention, torch.compile(causal_attention, fullgraph=True)):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        assert out.dtype == dtype
        out.backward(dout)
        torch.testing.assert_close(out.float(), expected, **tol)
        for leaf, want in zip(leaves, grads):
            assert leaf.grad.dtype == dtype
            torch.testing.assert_close(leaf.grad.float(), want, **tol)
    torch.library.opcheck(
        torch.ops.mobillama.causal_attention.default, [t.detach().requires_grad_() for t in _qkv(1, 2, 7, 16)]
    )


@needs_kernels
def test_model_uses_the_kernel_only_for_causal_attention_with_gradients(monkeypatch):
    torch.manual_seed(0)
    model = MobiLlama(get_preset("micro"))
    reference = MobiLlama(get_preset("micro"))
    reference.load_state_dict(model.state_dict())
    assert enable_for_training(model)
    calls = []
    original = Attention.causal_kernel

    def counting(q, k, v):
        calls.append(q.shape)
        return causal_attention(q, k, v)

    for module in model.modules():
        if isinstance(module, Attention):
            assert module.causal_kernel is causal_attention
            module.causal_kernel = counting
    assert original is None  # the class default stays SDPA
    ids = torch.randint(3, 256, (2, 12))
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1)}
    loss, expected = lm_loss_sum(model, batch), lm_loss_sum(reference, batch)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == get_preset("micro").num_hidden_layers
    loss.backward()
    expected.backward()
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6, msg=name)
    calls.clear()
    with torch.no_grad():  # evaluation and generation: SDPA
        model(ids)
    model(ids, attention_mask=torch.ones_like(ids).index_fill_(1, torch.tensor([0]), 0))  # padding mask: SDPA
    assert calls == []


def test_enable_for_training_declines_where_it_cannot_run(monkeypatch):
    model = MobiLlama(get_preset("micro"))
    monkeypatch.setenv("MOBILLAMA_KERNELS", "0")
    assert not enable_for_training(model)
    assert all(m.causal_kernel is None for m in model.modules() if isinstance(m, Attention))
    monkeypatch.delenv("MOBILLAMA_KERNELS")
    odd = MobiLlama(get_preset("micro").replace(hidden_size=96, num_attention_heads=4, num_key_value_heads=4))
    assert not enable_for_training(odd)  # head size 24 is not a multiple of 16


@needs_kernels
def test_trainer_switches_the_model_to_the_kernel(tmp_path):
    recipe = recipe_from_dict({"model": {"preset": "micro"}})
    model = MobiLlama(get_preset("micro"))
    Trainer(model, recipe, None, ctx=DistContext(), run_dir=tmp_path)
    assert all(m.causal_kernel is causal_attention for m in model.modules() if isinstance(m, Attention))
