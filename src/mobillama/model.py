"""The MobiLlama model in plain PyTorch: the whole decoder, readable in one sitting.

A Llama-style pre-norm decoder (RMSNorm, rotary attention, SwiGLU, no biases) with one twist: the
feed-forward networks live in ``model.ffns`` and each layer is *handed* its FFN at forward time instead
of owning one. With ``ffn_sharing: all`` there is a single FFN, so it exists once in memory and once in
the state dict, and autograd sums every layer's gradient into it. ``none`` gives one FFN per layer (a
plain Llama) and ``group:K`` one per K consecutive layers: sharing is a config field, not a fork.

State-dict names follow Hugging Face Llama wherever a layer owns the weight
(``model.layers.{i}.self_attn.q_proj.weight``, ``model.norm.weight``, ``lm_head.weight``); the FFNs are
``model.ffns.{g}.{gate,up,down}_proj.weight``. Converting to Llama is therefore a rename.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mobillama.config import ModelConfig


class Cache(Protocol):
    """What attention needs of a KV cache. Hugging Face's ``DynamicCache`` satisfies it too."""

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...


class KVCache:
    """A growing per-layer key/value cache for incremental decoding.

    ``update`` appends this step's keys and values for one layer and returns everything cached so far.
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as HF Llama does), then cast back before the scale.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """The head_dim/2 rotary frequencies (fp32): theta^(-2i/head_dim), changed by ``scaling``.

    ``scaling`` is a config's ``rope_scaling`` (:data:`mobillama.config.ROPE_SCALING_KEYS`), with the
    math of transformers' ``linear`` and ``llama3`` RoPE types; None is plain RoPE.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    kind, factor = scaling["rope_type"], scaling["factor"]
    if kind == "linear":  # positions interpolated: position p rotates as p / factor did
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"unsupported rope_type {kind!r}")
    # Llama 3: a frequency whose wavelength (in tokens) is longer than context / low_freq_factor is slowed
    # down by factor, one shorter than context / high_freq_factor is kept, and those between are a blend
    # whose weight on the kept frequency rises linearly in context / wavelength from low to high.
    context = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    keep = (context / wavelen - low) / (high - low)  # <= 0: slow down fully, >= 1: keep
    blended = (1 - keep) * inv_freq / factor + keep * inv_freq
    out = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    return torch.where((wavelen >= context / high) & (wavelen <= context / low), blended, out)


def rope_cos_sin(
    position_ids: torch.Tensor,
    head_dim: int,
    theta: float,
    dtype: torch.dtype,
    scaling: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [B, T, head_dim] for the given absolute positions (computed in fp32);
    ``scaling`` is the config's ``rope_scaling`` (see :func:`rope_inv_freq`)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, Hugging Face's rotate-half convention; x is [B, heads, T, head_dim]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    # Plain causal attention that needs gradients may run on a training kernel instead of SDPA (set by
    # mobillama.kernels.causal_attention.enable_for_training where the CPU has one); None: always SDPA.
    causal_kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: each kv head serves a group of q heads
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        # mask None means "plain causal over the whole sequence" (training, prefill without padding).
        if self.causal_kernel is not None and mask is None and cache is None and T > 1 and q.requires_grad:
            out = self.causal_kernel(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Attention and norms are the layer's own; the FFN is passed in, because it may be shared."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, ffn: FeedForward, cos, sin, mask, cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + ffn(self.post_attention_layernorm(x))


class Embedding(nn.Embedding):
    """``nn.Embedding`` that skips initializing a weight on the meta device.

    Checkpoint loading builds the model on ``meta`` and assigns the stored tensors; ``normal_`` on a meta
    tensor has nothing to fill but imports ``torch._dynamo`` (~800 modules, ~70 MB resident) on first use.
    """

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Decoder(nn.Module):
    """Embeddings, the layer stack with its FFNs, and the final norm: everything but the LM head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.ffns = nn.ModuleList(FeedForward(config) for _ in range(config.num_ffns))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, T, hidden].

        ``attention_mask`` is [B, past + T] with 1 for real tokens and 0 for padding (left padding for
        batched generation). Positions default to the count of real tokens before each one, so a
        left-padded prompt gets the same positions as the unpadded one.

        ``segment_ids`` [B, T] marks packed sequences (training only): a token attends only to earlier
        tokens of its own segment, and positions restart at 0 in each segment, so packing short
        conversations into one row trains exactly as if each were alone.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        past = cache.get_seq_length() if cache is not None else 0
        if segment_ids is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError(
                    "segment_ids (packed training rows) cannot be combined with a cache or attention_mask"
                )
            mask, seg_positions = segment_mask_and_positions(segment_ids)
            position_ids = seg_positions if position_ids is None else position_ids
        else:
            mask = build_attention_mask(attention_mask, B, T, past, x.device)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        c = self.config
        cos, sin = rope_cos_sin(position_ids, c.head_dim, c.rope_theta, x.dtype, c.rope_scaling)
        for i, layer in enumerate(self.layers):
            ffn = self.ffns[self.config.ffn_index(i)]
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, ffn, cos, sin, mask, cache, use_reentrant=False
                )
            else:
                x = layer(x, ffn, cos, sin, mask, cache)
        return self.norm(x)


def build_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, past: int, device: torch.device
) -> torch.Tensor | None:
    """A boolean [B, 1, T, past+T] mask (True = may attend), or None when plain causal attention will do.

    Each query sees the keys at or before its own position that are not padding. A padding query would
    see nothing, which makes softmax return NaN, so every query may also see itself.
    """
    if attention_mask is not None and bool(attention_mask[:, -(past + q_len) :].all()):
        attention_mask = None  # no padding: the cheaper causal paths below apply
    if attention_mask is None and (past == 0 or q_len == 1):
        return None  # plain causal (SDPA's is_causal), or one new token that may see everything
    total = past + q_len
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None].expand(batch, 1, q_len, total)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -total:].bool()
        allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed


def segment_mask_and_positions(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed rows: a [B, 1, T, T] causal mask confined to each segment, and per-segment positions."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = (same & (idx[None, :] <= idx[:, None]))[:, None]
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first_index = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return mask, idx - first_index


class MobiLlama(nn.Module):
    """The causal language model: :class:`Decoder` plus the LM head. Plain ``nn.Module``.

    ``forward`` returns logits [B, T, vocab] (fp32 is up to the caller's dtype). The Hugging Face
    shell in :mod:`mobillama.hf` composes the same two parts, so state dicts are interchangeable.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, segment_ids)
        return self.lm_head(hidden)

    def num_parameters(self) -> int:
        """Unique parameters: a shared FFN (or tied head) counts once."""
        return sum(p.numel() for p in self.parameters())


def init_weights(module: nn.Module, std: float) -> None:
    """Normal(0, std) for linear and embedding weights (std 0.02 as in the reference code); norms at 1.

    Meta tensors (a model about to receive a checkpoint's weights) are left alone: see :class:`Embedding`.
    """
    if getattr(module, "weight", None) is not None and module.weight.is_meta:
        return
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; labels are aligned with inputs (shifted here)."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index
    )


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), counting matmuls and attention.

    The shared FFN is *computed* in every layer even though it is *stored* once, so compute does not
    shrink with sharing; only parameters and memory do.
    """
    h, L = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    attn_proj = 2 * h * h + 2 * h * kv  # q, o and k, v
    ffn = 3 * h * config.intermediate_size
    head = h * config.vocab_size
    matmul = 2 * (L * (attn_proj + ffn) + head)
    attention = 2 * 2 * L * seq_len * h  # QK^T and AV, per token, causal average ignored (upper bound)
    return 3 * (matmul + attention)


__all__ = [
    "Attention",
    "Decoder",
    "DecoderLayer",
    "Embedding",
    "FeedForward",
    "KVCache",
    "MobiLlama",
    "RMSNorm",
    "apply_rope",
    "build_attention_mask",
    "causal_lm_loss",
    "flops_per_token",
    "init_weights",
    "rope_cos_sin",
    "rope_inv_freq",
    "segment_mask_and_positions",
]
