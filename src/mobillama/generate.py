"""Text generation: sampling, stop strings, streaming, batching, and a fast static-cache decode path.

The one generation module: the chat CLI, the server and evaluation all call :class:`Generator`.

Why a decode path of its own instead of ``model.forward`` with a growing cache: at batch 1 a decode step
is a chain of matrix-vector products, so speed is set by how fast the weights stream from memory, and
everything else must get out of the way (gpt-fast's recipe). :class:`FastDecoder` therefore

- runs the model's *own* submodules (no copy of the weights; quantized ``Linear`` replacements from
  :mod:`mobillama.quant` are picked up as they are), with the shared FFN called by every layer;
- writes keys/values into a static, preallocated cache: one fp32 tensor per layer, no ``torch.cat``
  per token. fp32 because bf16 SDPA at decode is ~7x slower on CPU (measured on 2-vCPU AVX-512); a
  per-layer tensor (not slices of one) because ``torch.compile`` copies a sliced cache whole per step;
- precomputes the rotary tables and per-row positions (left padding) once per request;
- disables oneDNN (mkldnn) for bf16 decode on CPU, where PyTorch's own matrix-vector kernel reads
  weights ~2x faster.

Greedy output of this path equals the argmax chain of the reference ``MobiLlama.forward`` (tested).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from mobillama import kernels, quant
from mobillama.errors import MobiLlamaError
from mobillama.model import MobiLlama, rope_cos_sin, rotate_half
from mobillama.tokenizer import (
    DEFAULT_SYSTEM_PROMPT,
    encode_prompt,
    is_mobillama_template,
    render_chat,
    stop_ids,
)

# The MobiLlama-Chat prompt format is defined once, in mobillama.tokenizer.
MOBILLAMA_CHAT_SYSTEM = DEFAULT_SYSTEM_PROMPT
CHAT_STOP_STRINGS = ("### Human:",)


def chat_stop_strings(tokenizer: Any) -> tuple[str, ...]:
    """The stop strings a chat adds: MobiLlama-Chat's ``### Human:`` only for a tokenizer whose template is
    MobiLlama-Chat (or that has none, and so is rendered with it). A ChatML model ends its turn with a
    stop token instead, and "### Human:" may be ordinary text in its answer."""
    template = getattr(getattr(tokenizer, "hf", tokenizer), "chat_template", None)
    return CHAT_STOP_STRINGS if is_mobillama_template(template) else ()


def render_mobillama_chat(messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Render messages in the MobiLlama-Chat format (for tokenizers without a template of their own).

    ``system\\n### Human: u1\\n### Assistant: a1</s>\\n### Human: u2\\n### Assistant:``. A leading
    ``system`` message replaces the default system line.
    """
    return render_chat(messages, add_generation_prompt)


class TokenizerLike(Protocol):
    """The part of ``mobillama.tokenizer.Tokenizer`` generation uses (the data stage's contract).

    ``encode_prompt`` and ``stop_ids`` may be missing from a minimal stand-in: prompts then get BOS and
    generation stops at ``eos_id`` (see :func:`mobillama.tokenizer.encode_prompt`).
    """

    eos_id: int
    bos_id: int
    pad_id: int | None
    stop_ids: tuple[int, ...]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def encode_prompt(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str: ...


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` means greedy (argmax)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stop_at_eos: bool = True  # stop at the tokenizer's stop tokens (EOS, end of turn, ...)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        def number(name: str, value: Any, kind: type) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise MobiLlamaError(
                    f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}"
                )

        number("max_new_tokens", self.max_new_tokens, int)
        number("temperature", self.temperature, float)
        number("top_k", self.top_k, int)
        number("top_p", self.top_p, float)
        number("repetition_penalty", self.repetition_penalty, float)
        if self.max_new_tokens < 1:
            raise MobiLlamaError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise MobiLlamaError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise MobiLlamaError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MobiLlamaError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise MobiLlamaError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise MobiLlamaError(f"seed must be an integer, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise MobiLlamaError(f"stop strings must be non-empty strings, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One prompt's result. ``finish_reason`` is "stop" (a stop token or string) or "length"."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as in transformers): seen tokens' positive logits / p, negative ones * p."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row from fp32 logits [B, vocab]: penalty, temperature, top-k, top-p, draw."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p (the first always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# The fast decode path
# --------------------------------------------------------------------------------------------------
class StaticKVCache:
    """Preallocated keys/values: one [B, kv_heads, max_len, head_dim] tensor per layer (fp32 on CPU)."""

    def __init__(
        self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device
    ) -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch, self.max_len = batch, max_len

    def fits(self, batch: int, max_len: int) -> bool:
        return self.batch == batch and self.max_len >= max_len


@contextlib.contextmanager
def _mkldnn_disabled() -> Iterator[None]:
    # torch.backends.mkldnn.flags() also resets TF32 settings and warns on every call; only the on/off bit
    # matters here.
    previous = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(previous)


def _no_mkldnn_for(dtype: torch.dtype, device: torch.device):
    """oneDNN's bf16 matrix-vector path is ~2x slower than PyTorch's own on CPU (measured)."""
    if device.type == "cpu" and dtype == torch.bfloat16:
        return _mkldnn_disabled()
    return contextlib.nullcontext()


class FastDecoder:
    """Prefill and single-token decode over a :class:`MobiLlama`'s modules with a :class:`StaticKVCache`.

    Slots in the cache are shared by all rows; a row with ``pad`` left-padding tokens has position
    ``slot - pad`` and never attends to its padding slots, the same semantics as the core's
    ``attention_mask``. With ``compile=True`` the decode step is ``torch.compile``-d with static shapes
    (attention over the whole cache, masked), so it compiles once per cache size.
    """

    def __init__(self, model: MobiLlama, *, compile: bool = False, cache_dtype: torch.dtype | None = None):
        self.model = model
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, _compute_dtype(model)
        # One-token attention through the project's fused CPU kernel where it runs (eager steps only).
        self.fused_attention = (
            self.device.type == "cpu"
            and cache_dtype in (None, torch.float32, torch.bfloat16)
            and self.config.head_dim % 16 == 0
            and not compile
            and kernels.available()
        )
        # The cache: fp32 attention math on CPU (bf16 SDPA is slow there). With the fused kernel, a model
        # that is not fp32 (bf16, or quantized) stores keys/values in bf16 - half the bytes each step
        # reads - and the kernel widens them to fp32; an fp32 model keeps an fp32 cache.
        low_precision = (
            model.model.embed_tokens.weight.dtype != torch.float32 or quant.quantized_module_count(model) > 0
        )
        if cache_dtype is None and self.device.type == "cpu":
            cache_dtype = torch.bfloat16 if self.fused_attention and low_precision else torch.float32
        self.cache_dtype = cache_dtype or self.dtype
        self.cache: StaticKVCache | None = None
        self.compiled = compile
        self._decode_fn = torch.compile(self._decode_static, dynamic=False) if compile else None
        self.ffn_for_layer = [
            model.model.ffns[self.config.ffn_index(i)] for i in range(self.config.num_hidden_layers)
        ]
        # Quantized layers on the project's CPU kernel: q/k/v and gate/up as one call each (exact).
        self.qkv_for_layer = [
            quant.joined_projection([a.q_proj, a.k_proj, a.v_proj])
            for a in (layer.self_attn for layer in model.model.layers)
        ]
        joined = {id(f): quant.joined_projection([f.gate_proj, f.up_proj]) for f in model.model.ffns}
        self.gate_up_for_layer = [joined[id(f)] for f in self.ffn_for_layer]
        # RMS norm and silu(gate) * up as one kernel call each when activations are fp32.
        self.fused_elementwise = self.fused_attention and self.dtype == torch.float32
        # A float LM head in another dtype than the activations: the head tied to the embedding table of
        # a quantized model (bf16 table, fp32 activations from the int8/int4 kernels). The last position
        # is cast to the head's dtype (a few KB) instead of the table to fp32 (twice its bytes, per step).
        head = model.lm_head
        head_dtype = head.weight.dtype if isinstance(head, torch.nn.Linear) else self.dtype
        self.head_dtype = head_dtype if head_dtype != self.dtype else None

    # ---- request setup -------------------------------------------------------------------------
    def start(self, pad_lens: Sequence[int], total_len: int) -> None:
        """Prepare for a batch whose rows have ``pad_lens`` left-padding slots and ``total_len`` slots."""
        c = self.config
        batch = len(pad_lens)
        # Round the cache up so consecutive requests of similar size reuse it (and a compiled step).
        max_len = min(c.max_position_embeddings, -(-total_len // 64) * 64)
        if self.cache is None or not self.cache.fits(batch, max_len):
            self.cache = None  # free the old one first
            self.cache = StaticKVCache(
                c.num_hidden_layers,
                batch,
                c.num_key_value_heads,
                max_len,
                c.head_dim,
                self.cache_dtype,
                self.device,
            )
        max_len = self.cache.max_len
        pad = torch.tensor(list(pad_lens), device=self.device)
        slots = torch.arange(max_len, device=self.device)
        self.positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # [B, S]
        cos, sin = rope_cos_sin(
            torch.arange(max_len, device=self.device)[None], c.head_dim, c.rope_theta, torch.float32
        )
        self.cos_table, self.sin_table = cos[0], sin[0]  # [S, head_dim]
        self.key_valid = slots[None, :] >= pad[:, None]  # [B, S]
        self.padded = bool(any(pad_lens))
        # Decode mask over the whole cache: grows by one slot per step (used when compiled or padded).
        self.decode_mask = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool, device=self.device)

    # ---- forward pieces --------------------------------------------------------------------------
    def _layers(self, x: torch.Tensor, input_pos: torch.Tensor, mask, is_causal: bool, attend_len: int):
        c = self.config
        B, T, _ = x.shape
        nh, hd = c.num_attention_heads, c.head_dim
        pos = self.positions.index_select(1, input_pos)  # [B, T]
        cos, sin = self.cos_table[pos][:, None], self.sin_table[pos][:, None]  # [B, 1, T, hd]
        fused = self.fused_attention and T == 1
        for i, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            h = self._norm(layer.input_layernorm, x)
            qkv = self.qkv_for_layer[i]
            q, k, v = qkv(h) if qkv else (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))
            if fused:
                out = kernels.attention_decode(
                    *(t.reshape(B, -1).float() for t in (q, k, v)), cos[:, 0, 0], sin[:, 0, 0],
                    self.cache.keys[i], self.cache.values[i], attend_len - 1,
                    self.key_valid if self.padded else None,
                )  # fmt: skip
            else:
                out = self._attention(i, q, k, v, cos, sin, input_pos, mask, is_causal, attend_len)
            x = x + attn.o_proj(out.reshape(B, T, nh * hd).to(x.dtype))
            x = x + self._ffn(i, self._norm(layer.post_attention_layernorm, x))
        return x

    def _norm(self, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.fused_elementwise:
            return kernels.rmsnorm(x, norm.weight, norm.eps)
        return norm(x)

    def _attention(self, i, q, k, v, cos, sin, input_pos, mask, is_causal, attend_len) -> torch.Tensor:
        """PyTorch attention over the cache (prefill, compiled decode, no fused kernel): [B, T, H*D]."""
        B, T, _ = q.shape
        nh, nkv, hd = self.config.num_attention_heads, self.config.num_key_value_heads, self.config.head_dim
        math = (
            torch.float32
            if self.cache_dtype == torch.bfloat16 and q.device.type == "cpu"
            else self.cache_dtype
        )
        q = q.reshape(B, T, nh, hd).transpose(1, 2).to(math)
        k = k.reshape(B, T, nkv, hd).transpose(1, 2).to(math)
        v = v.reshape(B, T, nkv, hd).transpose(1, 2).to(math)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache, v_cache = self.cache.keys[i], self.cache.values[i]
        k_cache.index_copy_(2, input_pos, k.to(k_cache.dtype))
        v_cache.index_copy_(2, input_pos, v.to(v_cache.dtype))
        if k_cache.dtype == math:
            keys, values = k_cache[:, :, :attend_len], v_cache[:, :, :attend_len]
        else:  # a bf16 cache under fp32 math: as the fused kernel reads it (widened, exact)
            keys, values = k_cache[:, :, :attend_len].to(math), v_cache[:, :, :attend_len].to(math)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=is_causal, enable_gqa=nkv != nh
        )
        return out.transpose(1, 2).reshape(B, T, nh * hd)

    def _ffn(self, i: int, h: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_for_layer[i]
        if gate_up is None:
            return self.ffn_for_layer[i](h)
        gate, up = gate_up(h)
        act = kernels.silu_mul(gate, up) if self.fused_elementwise else F.silu(gate) * up
        return self.ffn_for_layer[i].down_proj(act)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        h = self._norm(self.model.model.norm, x[:, -1:].contiguous())
        if self.head_dtype is None:
            return self.model.lm_head(h)[:, -1].float()
        # Matrix-vector product in the head's own dtype (bf16: PyTorch's kernel, as for a bf16 model).
        off = self.head_dtype == torch.bfloat16 and self.device.type == "cpu" and not self.compiled
        with _mkldnn_disabled() if off else contextlib.nullcontext():
            return self.model.lm_head(h.to(self.head_dtype))[:, -1].float()

    def _decode_static(self, ids: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.model.model.embed_tokens(ids).to(self.dtype)
        return self._logits(self._layers(x, input_pos, mask, False, mask.shape[-1]))

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the padded prompts [B, T] into slots 0..T-1; fp32 logits of the last position [B, V]."""
        B, T = ids.shape
        input_pos = torch.arange(T, device=self.device)
        mask = None
        if self.padded:
            causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
            mask = causal[None, None] & self.key_valid[:, None, None, :T]
            mask = mask | torch.eye(T, dtype=torch.bool, device=self.device)  # padding queries see themselves
        self.decode_mask[:, :, :, :T] = self.key_valid[:, None, None, :T]
        x = self.model.model.embed_tokens(ids).to(self.dtype)
        return self._logits(self._layers(x, input_pos, mask, mask is None and T > 1, T))

    @torch.inference_mode()
    def decode(self, token: torch.Tensor, slot: int) -> torch.Tensor:
        """Feed one token per row [B] at cache slot ``slot``; fp32 logits [B, V]."""
        self.decode_mask[:, :, :, slot] = True
        input_pos = torch.tensor([slot], device=self.device)
        with _no_mkldnn_for(self.dtype, self.device):
            if self._decode_fn is not None:
                return self._decode_fn(token[:, None], input_pos, self.decode_mask).clone()
            x = self.model.model.embed_tokens(token[:, None]).to(self.dtype)
            mask = self.decode_mask[:, :, :, : slot + 1] if self.padded else None
            return self._logits(self._layers(x, input_pos, mask, False, slot + 1))


class FileRowEmbedding(torch.nn.Module):
    """An embedding lookup that reads the rows it needs from the checkpoint file instead of from memory.

    Why: at one token per step only a handful of the table's rows are ever used, but a table mapped from
    the file becomes resident in whole on the first lookups (each page fault maps a large block around
    the row), 131 MB for MobiLlama-0.5B - 12% of its bf16 weights. Reading rows with ``os.preadv`` keeps
    them in the OS page cache (shared, reclaimable) and out of the process.

    ``weight`` is a stand-in with the table's shape and dtype and no storage (one value, expanded), so
    code that asks for the dtype, shape or byte count of the embedding sees the real ones, and nothing
    keeps the checkpoint file mapped. Inference only: no gradient, and the module refuses to be saved.
    """

    def __init__(self, weight: torch.Tensor, file: str | Path, offset: int) -> None:
        super().__init__()
        stand_in = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
        self.register_buffer("weight", stand_in, persistent=False)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.file, self.offset = str(file), offset
        self.row_bytes = self.embedding_dim * weight.element_size()
        self._fd = os.open(self.file, os.O_RDONLY)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range for an embedding of {self.num_embeddings} rows")
        if not flat.numel():
            return torch.empty(*ids.shape, self.embedding_dim, dtype=self.weight.dtype)
        unique, inverse = torch.unique(flat, return_inverse=True)
        rows = torch.empty(len(unique), self.embedding_dim, dtype=self.weight.dtype)
        view = memoryview(rows.view(torch.uint8).reshape(-1).numpy())
        for i, token in enumerate(unique.tolist()):
            chunk = view[i * self.row_bytes : (i + 1) * self.row_bytes]
            if os.preadv(self._fd, [chunk], self.offset + token * self.row_bytes) != self.row_bytes:
                raise MobiLlamaError(f"{self.file}: embedding row {token} is past the end (file truncated?)")
        return rows[inverse].reshape(*ids.shape, self.embedding_dim)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        raise MobiLlamaError(
            "this model reads its embedding rows from the checkpoint file (loaded for inference); "
            "load it with mobillama.checkpoint.load_model to save it"
        )

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self._fd)


def serve_embedding_from_file(model: MobiLlama, checkpoint_dir: str | Path) -> bool:
    """Swap the input embedding for a :class:`FileRowEmbedding` when the checkpoint's table can be read
    as is (same dtype, not tied to the LM head, CPU, Linux/macOS); returns whether it was swapped.

    A tied table is left in memory: the head reads all of it at every step anyway, and the head and the
    embedding keep sharing that one tensor (reading rows from the file would save nothing)."""
    from mobillama.checkpoint import WEIGHTS_NAME, safetensors_location

    embed = model.model.embed_tokens
    tied = model.config.tie_word_embeddings or getattr(model.lm_head, "weight", None) is embed.weight
    if tied or embed.weight.device.type != "cpu" or not hasattr(os, "preadv"):
        return False
    file = Path(checkpoint_dir) / WEIGHTS_NAME
    where = safetensors_location(file, "model.embed_tokens.weight")
    if where is None or where[1] != tuple(embed.weight.shape) or where[2] != embed.weight.dtype:
        return False
    model.model.embed_tokens = FileRowEmbedding(embed.weight, file, where[0])
    return True


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The activation dtype: the embedding's (quantized layers keep integer weights), except fp32 when
    the project's int8/int4 kernels run the matmuls (they take and return fp32; no casts per call)."""
    if any(isinstance(m, quant.QuantizedLinear) and m._vnni is not None for m in model.modules()):
        return torch.float32
    return model.model.embed_tokens.weight.dtype


# --------------------------------------------------------------------------------------------------
# Generation: prompts in, completions (or streamed text) out
# --------------------------------------------------------------------------------------------------
@dataclass
class _Row:
    prompt_tokens: int
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    generated: int = 0  # tokens produced, the stop token included (ids excludes it)
    finish_reason: str | None = None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters must wait: an incomplete UTF-8 sequence or a possible stop prefix."""
    hold = 0
    while hold < len(text) and text[len(text) - 1 - hold] == "\ufffd":
        hold += 1
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


class Generator:
    """Generate from a model and a tokenizer (anything with :class:`TokenizerLike`'s interface).

    One object serves many requests: the static cache is kept and reused while requests fit it.
    """

    def __init__(self, model: MobiLlama, tokenizer: TokenizerLike | None = None, *, compile: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.decoder = FastDecoder(model, compile=compile)
        self.context = model.config.max_position_embeddings

    # ---- input checks --------------------------------------------------------------------------
    def encode_prompts(self, prompts: str | Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
        """Token ids of text prompts. ``add_bos=None`` follows the tokenizer's rule (BOS only where it adds
        one to plain text, never twice, see :func:`mobillama.tokenizer.encode_prompt`); True/False force it."""
        if self.tokenizer is None:
            raise MobiLlamaError("this generator has no tokenizer: pass token ids instead of text")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise MobiLlamaError("no prompts given")
        out = []
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise MobiLlamaError(f"prompt {i} must be a string, got {type(p).__name__}")
            if not p:
                raise MobiLlamaError(f"prompt {i} is empty")
            if add_bos is None:
                out.append(encode_prompt(self.tokenizer, p))
            else:
                out.append(self.tokenizer.encode(p, add_bos=add_bos))
        return out

    def _check_ids(self, prompt_ids: Sequence[Sequence[int]]) -> None:
        if not prompt_ids:
            raise MobiLlamaError("no prompts given")
        vocab = self.model.config.vocab_size
        for i, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise MobiLlamaError(f"prompt {i} is empty")
            if len(ids) >= self.context:
                raise MobiLlamaError(
                    f"prompt {i} has {len(ids)} tokens; the model's context is {self.context} "
                    "(leave room for at least one new token)"
                )
            bad = next(
                (t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None
            )
            if bad is not None:
                raise MobiLlamaError(f"prompt {i} has token id {bad!r} outside the vocabulary [0, {vocab})")

    # ---- the loop ------------------------------------------------------------------------------
    def iter_ids(
        self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> Iterator[tuple[int, str]]:
        """Yield ``(row, text_delta)`` as text becomes final; return the list of :class:`Completion`.

        Stop strings are matched on the decoded text, so one that spans several tokens is found; text
        that could still turn into a stop string (or is an incomplete UTF-8 sequence) is held back
        until it is decided. Without a tokenizer no text is produced (ids only; the model's EOS still
        stops). With one, any of its stop tokens (EOS, the chat template's end-of-turn token, the
        checkpoint's generation_config ids) ends a row; the stop token is in neither ids nor text.
        """
        if not isinstance(params, SamplingParams):
            raise MobiLlamaError("params must be a SamplingParams")
        self._check_ids(prompt_ids)
        if params.stop and self.tokenizer is None:
            raise MobiLlamaError("stop strings need a tokenizer")
        tok = self.tokenizer
        stops = frozenset(stop_ids(tok) if tok is not None else (self.model.config.eos_token_id,))
        pad_id = (getattr(tok, "pad_id", None) if tok is not None else None) or 0
        lengths = [len(p) for p in prompt_ids]
        T = max(lengths)
        new_tokens = min(params.max_new_tokens, self.context - T)
        B = len(prompt_ids)
        pads = [T - n for n in lengths]
        ids = torch.tensor(
            [[pad_id] * pad + list(p) for pad, p in zip(pads, prompt_ids)], device=self.decoder.device
        )
        rows = [_Row(prompt_tokens=n) for n in lengths]
        generator = torch.Generator(device=self.decoder.device)
        generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, self.model.config.vocab_size, dtype=torch.bool, device=self.decoder.device)
            seen.scatter_(1, ids, True)
            for b, pad in enumerate(pads):  # padding is not a seen token
                if pad:
                    seen[b, pad_id] = bool((ids[b, pad:] == pad_id).any())

        self.decoder.start(pads, T + new_tokens)
        logits = self.decoder.prefill(ids)
        for step in range(new_tokens):
            next_tokens = sample_next(logits, params, generator, seen)
            if seen is not None:
                seen.scatter_(1, next_tokens[:, None], True)
            for b, t in enumerate(next_tokens.tolist()):
                row = rows[b]
                if row.finish_reason is not None:
                    continue
                delta = self._advance(row, t, stops, params, last=step == new_tokens - 1)
                if delta:
                    yield b, delta
            if all(r.finish_reason is not None for r in rows):
                break
            logits = self.decoder.decode(next_tokens, T + step)
        return [
            Completion(r.text, r.ids, r.finish_reason or "length", r.prompt_tokens, r.generated) for r in rows
        ]

    def _advance(
        self, row: _Row, token: int, stops: frozenset[int], params: SamplingParams, last: bool
    ) -> str:
        """Append one token to a row, decide whether it finished, and return the text now final."""
        row.generated += 1
        if params.stop_at_eos and token in stops:
            row.finish_reason = "stop"  # the stop token is counted but is not part of ids or text
        else:
            row.ids.append(token)
            if self.tokenizer is not None:
                row.text = self.tokenizer.decode(row.ids)
                hits = [i for i in (row.text.find(s) for s in params.stop) if i >= 0]
                if hits:
                    row.text = row.text[: min(hits)]
                    row.finish_reason = "stop"
        if last and row.finish_reason is None:
            row.finish_reason = "length"
        end = len(row.text) if row.finish_reason else len(row.text) - _held_back(row.text, params.stop)
        delta = row.text[row.emitted : end] if end > row.emitted else ""
        row.emitted = max(row.emitted, end)
        return delta

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[Completion]:
        """Generate for already-tokenized prompts (batched, left-padded); ``on_text(row, delta)`` streams."""
        it = self.iter_ids(prompt_ids, params)
        while True:
            try:
                row, delta = next(it)
            except StopIteration as done:
                completions = done.value
                break
            if on_text is not None:
                on_text(row, delta)
        return completions

    def generate(
        self,
        prompts: str | Sequence[str],
        params: SamplingParams | None = None,
        on_text: Callable[[int, str], None] | None = None,
        add_bos: bool | None = None,
    ) -> list[Completion]:
        """Generate for one or several text prompts (several are batched with left padding); BOS as
        :meth:`encode_prompts` puts it."""
        return self.generate_ids(self.encode_prompts(prompts, add_bos), params or SamplingParams(), on_text)

    def stream(
        self, prompt: str, params: SamplingParams | None = None, add_bos: bool | None = None
    ) -> Iterator[str]:
        """Yield the text of one prompt's completion as it is produced."""
        for _, delta in self.iter_ids(self.encode_prompts(prompt, add_bos), params or SamplingParams()):
            yield delta


def reference_greedy(model: MobiLlama, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by re-running the full reference forward every step (slow; the test oracle)."""
    ids = torch.tensor([list(prompt_ids)])
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            nxt = int(model(ids)[0, -1].float().argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


# --------------------------------------------------------------------------------------------------
# Loading for inference
# --------------------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise MobiLlamaError(f"unknown dtype {name!r}; choose one of: fp32, bf16")
    return DTYPES[name]


def load_for_inference(
    spec: str | Path,
    *,
    dtype: str | torch.dtype = "bf16",
    bits: int | None = None,
    group_size: int | None = None,
    int8_kernel: str = "auto",
    int4_kernel: str = "auto",
    seed: int = 0,
) -> MobiLlama:
    """A model ready to generate: a preset (random weights, built directly in ``dtype``), a checkpoint
    directory, or a quantized checkpoint directory (written by ``mobillama quantize``; loaded as is).

    ``bits`` quantizes a full-precision model on the fly (8 or 4); a quantized checkpoint keeps its own.
    """
    from mobillama.checkpoint import load_model
    from mobillama.config import PRESETS, get_preset

    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    path = Path(spec)
    if path.is_dir() and quant.is_quantized_checkpoint(path):
        if bits is not None and bits != quant.read_quantization(path)["bits"]:
            raise MobiLlamaError(
                f"{path} is already quantized to {quant.read_quantization(path)['bits']} bits"
            )
        model = quant.load_quantized(
            path, dtype=torch_dtype, int8_kernel=int8_kernel, int4_kernel=int4_kernel
        )
        serve_embedding_from_file(model, path)
        return model
    if str(spec) in PRESETS and not path.exists():
        # Build in the target dtype directly: no fp32 copy of the whole model (peak memory).
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)
        try:
            model = MobiLlama(get_preset(str(spec))).eval()
        finally:
            torch.set_default_dtype(previous)
    elif not path.exists():
        raise MobiLlamaError(
            f"{str(spec)!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory"
        )
    else:
        model = load_model(spec, dtype=torch_dtype)
        serve_embedding_from_file(model, path)
    if bits is not None:
        quant.quantize_model(model, bits, group_size, int8_kernel=int8_kernel, int4_kernel=int4_kernel)
    return model


def load_checkpoint_tokenizer(path: str | Path) -> TokenizerLike:
    """The tokenizer stored in a checkpoint directory, with the checkpoint's generation_config.json stop ids
    (:func:`mobillama.tokenizer.load_tokenizer` reads them from the same directory)."""
    from mobillama.tokenizer import load_tokenizer

    path = Path(path)
    if not path.is_dir() or not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise MobiLlamaError(f"{path} has no tokenizer files (tokenizer.json or tokenizer.model)")
    return load_tokenizer(path)


__all__ = [
    "CHAT_STOP_STRINGS",
    "MOBILLAMA_CHAT_SYSTEM",
    "Completion",
    "FastDecoder",
    "Generator",
    "SamplingParams",
    "StaticKVCache",
    "TokenizerLike",
    "apply_repetition_penalty",
    "chat_stop_strings",
    "load_checkpoint_tokenizer",
    "load_for_inference",
    "reference_greedy",
    "render_mobillama_chat",
    "sample_next",
]
