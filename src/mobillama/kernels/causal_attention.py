"""Causal attention for training on the CPU as a PyTorch operator: ``mobillama::causal_attention``.

Wraps the forward and backward of ``attention_train_avx512.c`` in ``torch.library`` custom operators, with
fake (shape-only) implementations and an autograd formula, so ``torch.compile`` keeps them as single calls
inside compiled layers. fp32 arithmetic for fp32 and bf16 inputs alike (bf16 under autocast is converted
on the way in and the results on the way out); the backward recomputes the probabilities from the rows'
log-sum-exp, so it saves what PyTorch's flash kernel saves (q, k, v, the output and the log-sum-exp).

:func:`enable_for_training` switches a model's :class:`mobillama.model.Attention` modules to it where it
can run; they use it only for plain causal attention that needs gradients, and SDPA otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from mobillama import kernels
from mobillama.model import Attention


@torch.library.custom_op("mobillama::causal_attention", mutates_args=())
def causal_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q k^T / sqrt(D), causal) v, the rows' log-sum-exp) for [B, H, T, D] q, k, v."""
    out, lse = kernels.attention_train_forward(q.float(), k.float(), v.float())
    return out.to(q.dtype), lse


@causal_attention_with_lse.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, _ = q.shape
    return kernels.projection_layout(q, q.dtype), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("mobillama::causal_attention_backward", mutates_args=())
def causal_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = kernels.attention_train_backward(
        q.float(), k.float(), v.float(), out.float(), lse, dout.float()
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@causal_attention_backward.register_fake
def _(q, k, v, out, lse, dout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        kernels.projection_layout(q, q.dtype),
        kernels.projection_layout(k, k.dtype),
        kernels.projection_layout(v, v.dtype),
    )


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, dout: torch.Tensor, _dlse: torch.Tensor):
    q, k, v, out, lse = ctx.saved_tensors
    return causal_attention_backward(q, k, v, out, lse, dout)


causal_attention_with_lse.register_autograd(_backward, setup_context=_setup_context)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of [B, H, T, D] q, k, v (as many k/v heads as q heads); output [B, H, T, D]."""
    return causal_attention_with_lse(q, k, v)[0]


def enable_for_training(model: nn.Module) -> bool:
    """Let the model's attention layers train with the kernel; False (nothing changed) where it cannot run.

    It runs on x86-64 Linux CPUs with AVX-512 (see :func:`mobillama.kernels.unavailable_reason`) for head
    sizes that are multiples of 16; ``MOBILLAMA_KERNELS=0`` turns it off. Parameters are untouched.
    """
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    devices = {p.device.type for p in model.parameters()}
    if not layers or devices != {"cpu"} or any(a.head_dim % 16 for a in layers) or not kernels.available():
        return False
    for attention in layers:
        attention.causal_kernel = causal_attention
    return True
