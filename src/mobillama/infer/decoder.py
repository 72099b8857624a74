"""The fast decode path: a static KV cache and prefill / one-token decode over a model's own modules.

Why a decode path of its own instead of ``MobiLlama.forward`` with a growing cache: at batch 1 a decode
step is a chain of matrix-vector products, so speed is set by how fast the weights stream from memory,
and everything else must get out of the way (gpt-fast's recipe). :class:`FastDecoder` therefore

- runs the model's *own* submodules (no copy of the weights; quantized ``Linear`` replacements from
  :mod:`mobillama.infer.quant_layers` are picked up as they are), with the shared FFN called by every layer;
- writes keys/values into a static, preallocated cache: one tensor per layer, no ``torch.cat`` per
  token. fp32 on CPU because bf16 SDPA at decode is ~7x slower there (measured on 2-vCPU AVX-512), or
  bf16 when the project's fused attention kernel reads it; a per-layer tensor (not slices of one)
  because ``torch.compile`` copies a sliced cache whole per step;
- calls the project's fused CPU kernels (one-token attention, RMS norm, silu*up, joined q/k/v and
  gate/up projections of quantized layers) where they run, which ``forward`` does not;
- precomputes the rotary tables and per-row positions (left padding) once per request;
- disables oneDNN (mkldnn) for bf16 decode on CPU, where PyTorch's own matrix-vector kernel reads
  weights ~2x faster.

It is not ``MobiLlama.forward`` with a static cache because the model's forward is the training and
reference path (autograd, any sequence length, the growing :class:`~mobillama.model.KVCache` the HF
wrapper uses): folding the kernels, cache dtypes and mkldnn switch into it would put inference-only
branches in every training step. What the two share is not duplicated: the rotary tables
(:func:`~mobillama.model.rope_cos_sin`, :func:`~mobillama.model.rotate_half`) and every weight-holding
module. Greedy output of this path equals the argmax chain of the reference forward (tested, see
:func:`mobillama.infer.generator.reference_greedy`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mobillama import kernels
from mobillama.infer import quant
from mobillama.infer.quant_layers import PROJECT_KERNELS, QuantizedLinear
from mobillama.model import MobiLlama, rope_cos_sin, rotate_half


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
        self.device, self.dtype = param.device, compute_dtype(model)
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
            quant.embedding_dtype(model) != torch.float32 or quant.quantized_module_count(model) > 0
        )
        # Without AVX-512 the one-call decode step can still run on the AVX2 kernels (decided below, once
        # the layers are joined); its attention reads a bf16 cache as the AVX-512 one does.
        avx2_step = (
            not self.fused_attention
            and self.device.type == "cpu"
            and cache_dtype in (None, torch.float32, torch.bfloat16)
            and self.config.head_dim % 8 == 0
            and not compile
            and kernels.matmul_isa() == "avx2"
        )
        if cache_dtype is None and self.device.type == "cpu":
            cache_dtype = (
                torch.bfloat16 if (self.fused_attention or avx2_step) and low_precision else torch.float32
            )
        self.cache_dtype = cache_dtype or self.dtype
        self.cache: StaticKVCache | None = None
        self.compiled = compile
        self._decode_fn = torch.compile(self._decode_static, dynamic=False) if compile else None
        self.ffn_for_layer = [
            model.model.ffns[self.config.ffn_index(i)] for i in range(self.config.num_hidden_layers)
        ]
        # Quantized layers on the project's CPU kernel: q/k/v and gate/up as one call each (exact).
        # Each join frees the separate packed parts; handed back to the OS at once (glibc's heap would keep
        # them resident), the joins never hold more than one layer's matrices twice.
        self.qkv_for_layer = []
        for layer in model.model.layers:
            a = layer.self_attn
            self.qkv_for_layer.append(joined_projection([a.q_proj, a.k_proj, a.v_proj]))
            quant.release_freed_memory()
        joined = {}
        for f in model.model.ffns:
            joined[id(f)] = joined_projection([f.gate_proj, f.up_proj])
            quant.release_freed_memory()
        self.gate_up_for_layer = [joined[id(f)] for f in self.ffn_for_layer]
        # RMS norm and silu(gate) * up as one kernel call each when activations are fp32.
        self.fused_elementwise = self.fused_attention and self.dtype == torch.float32
        # A float LM head in another dtype than the activations: the head tied to the embedding table of
        # a quantized model (bf16 table, fp32 activations from the int8/int4 kernels). The last position
        # is cast to the head's dtype (a few KB) instead of the table to fp32 (twice its bytes, per step).
        head = model.lm_head
        head_dtype = head.weight.dtype if isinstance(head, torch.nn.Linear) else self.dtype
        self.head_dtype = head_dtype if head_dtype != self.dtype else None
        # ... and such a bf16 head on the project's kernel: fp32 activations times the widened table
        # (PyTorch's bf16 matrix-vector product was the largest single cost of a SmolLM2 int4 token).
        # None where it cannot run, else the build: "vnni" (AVX-512) or "avx2".
        self.bf16_head_kernel = (
            self.head_dtype == torch.bfloat16
            and self.dtype == torch.float32
            and self.device.type == "cpu"
            and not compile
            and isinstance(head, torch.nn.Linear)
            and head.bias is None
            and head.weight.is_contiguous()
            and kernels.matmul_isa()
        ) or None
        # Where every piece of a layer runs on the project's kernels, a decode step goes through all layers
        # in one C call (same kernels, same order, same numbers; no trips back to Python between them): the
        # AVX-512 ones, or the AVX2 ones on a CPU without AVX-512; a prompt of one sequence too.
        self.step_isa = (
            "vnni" if self.fused_attention and self.fused_elementwise
            else "avx2" if avx2_step and self.dtype == torch.float32
            else None
        )  # fmt: skip
        self.one_call_layers = self._one_call_layers()
        self._layer_array = None  # the layers with this request's cache addresses, built by start()

    def _one_call_layers(self) -> list | None:
        """The layers as :class:`~mobillama.kernels.DecodeLayer` structs (caches filled in by
        :meth:`start`), or None where some piece of a layer would not run on the project's kernels."""
        c = self.config
        isa = self.step_isa
        if isa is None:
            return None
        H, Hkv, D, inter = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
        out = []
        for i, layer in enumerate(self.model.model.layers):
            qkv, gate_up = self.qkv_for_layer[i], self.gate_up_for_layer[i]
            o, down = layer.self_attn.o_proj, self.ffn_for_layer[i].down_proj
            norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            on_kernel = [isinstance(m, QuantizedLinear) and m.kernel_in_use == isa for m in (o, down)]
            if (
                qkv is None or gate_up is None or not all(on_kernel) or {qkv.isa, gate_up.isa} != {isa}
                or qkv.out_features != (H + 2 * Hkv) * D or gate_up.sizes != [inter, inter]
                or o.in_features != H * D or down.in_features != inter
                or {w.dtype for w in norms} not in ({torch.float32}, {torch.bfloat16})
                or not all(w.is_contiguous() for w in norms)
            ):  # fmt: skip
                return None
            out.append(
                kernels.DecodeLayer(
                    norm1=norms[0].data_ptr(),
                    norm2=norms[1].data_ptr(),
                    norm_bf16=norms[0].dtype == torch.bfloat16,
                    eps1=layer.input_layernorm.eps,
                    eps2=layer.post_attention_layernorm.eps,
                    qkv=_qmatrix(qkv),
                    o=_qmatrix(o),
                    gate_up=_qmatrix(gate_up),
                    down=_qmatrix(down),
                )
            )
        return out

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
            if self.one_call_layers is not None:
                self._layer_array = (kernels.DecodeLayer * len(self.one_call_layers))(*self.one_call_layers)
                for i, layer in enumerate(self._layer_array):
                    layer.k_cache = self.cache.keys[i].data_ptr()
                    layer.v_cache = self.cache.values[i].data_ptr()
        max_len = self.cache.max_len
        pad = torch.tensor(list(pad_lens), device=self.device)
        slots = torch.arange(max_len, device=self.device)
        self.positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # [B, S]
        cos, sin = rope_cos_sin(
            torch.arange(max_len, device=self.device)[None],
            c.head_dim,
            c.rope_theta,
            torch.float32,
            c.rope_scaling,
        )
        self.cos_table, self.sin_table = cos[0], sin[0]  # [S, head_dim]
        self.key_valid = slots[None, :] >= pad[:, None]  # [B, S]
        self.key_valid_u8 = self.key_valid.to(torch.uint8)  # as the C kernels read it
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
        h = x[:, -1:].contiguous()
        norm = self.model.model.norm
        if self.step_isa is not None and not self.fused_elementwise:  # the AVX2 step: its norm kernel too,
            h = kernels.rmsnorm(h, norm.weight, norm.eps, self.step_isa)  # as the lean runtime computes it
        else:
            h = self._norm(norm, h)
        if self.head_dtype is None:
            return self.model.lm_head(h)[:, -1].float()
        if self.bf16_head_kernel:
            return kernels.bf16_linear(h[:, -1], self.model.lm_head.weight, self.bf16_head_kernel)
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
        return self.prefill_embeds(self.model.model.embed_tokens(ids))

    @torch.inference_mode()
    def prefill_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """:meth:`prefill` from input embeddings [B, T, H] (a MobiLlama-V prompt: text and image tokens)."""
        B, T, _ = embeds.shape
        if self._layer_array is not None and B == 1 and not self.padded:
            return self._logits(self._one_call_prefill(embeds))
        input_pos = torch.arange(T, device=self.device)
        mask = None
        if self.padded:
            causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
            mask = causal[None, None] & self.key_valid[:, None, None, :T]
            mask = mask | torch.eye(T, dtype=torch.bool, device=self.device)  # padding queries see themselves
        self.decode_mask[:, :, :, :T] = self.key_valid[:, None, None, :T]
        return self._logits(self._layers(embeds.to(self.dtype), input_pos, mask, mask is None and T > 1, T))

    @torch.inference_mode()
    def decode(self, token: torch.Tensor, slot: int) -> torch.Tensor:
        """Feed one token per row [B] at cache slot ``slot``; fp32 logits [B, V]."""
        self.decode_mask[:, :, :, slot] = True
        input_pos = torch.tensor([slot], device=self.device)
        with _no_mkldnn_for(self.dtype, self.device):
            if self._decode_fn is not None:
                return self._decode_fn(token[:, None], input_pos, self.decode_mask).clone()
            x = self.model.model.embed_tokens(token[:, None]).to(self.dtype)
            if self._layer_array is not None:
                return self._logits(self._one_call_step(x, slot))
            mask = self.decode_mask[:, :, :, : slot + 1] if self.padded else None
            return self._logits(self._layers(x, input_pos, mask, False, slot + 1))

    def _one_call_prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        """One prompt [1, T, H] through every layer in one C call: the projections read each weight once
        for all T tokens and each token attends to the slots before it, which equals feeding the prompt one
        token at a time exactly (so this runtime and the lean one answer alike), unlike PyTorch's attention."""
        c = self.config
        T = embeds.shape[1]
        self.decode_mask[:, :, :, :T] = True
        h = kernels.prefill_layers(
            embeds[0].to(self.dtype, copy=True).contiguous(), self._layer_array, self.cos_table[:T].contiguous(),
            self.sin_table[:T].contiguous(), self.cache.max_len, 0, self.cache_dtype == torch.bfloat16,
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim), c.intermediate_size, self.step_isa,
        )  # fmt: skip
        return h.view(1, T, c.hidden_size)

    def _one_call_step(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        c = self.config
        B = x.shape[0]
        pos = self.positions[:, slot]
        h = kernels.decode_layers(
            x.reshape(B, c.hidden_size).contiguous(), self._layer_array, self.cos_table[pos],
            self.sin_table[pos], self.cache.max_len, slot, self.key_valid_u8 if self.padded else None,
            self.cache_dtype == torch.bfloat16, (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            c.intermediate_size, self.step_isa,
        )  # fmt: skip
        return h.view(B, 1, c.hidden_size)


# Quantized projections of the same input joined into one kernel call (q/k/v, gate/up).
def joined_projection(layers: list[nn.Module]):
    """One kernel call for several projections of the same input (q/k/v, gate/up), or None.

    Applies when every layer runs on the vnni kernel with the same input size, bits and group: their
    packed rows are concatenated (the layout is blocks of 16 rows, so the join of the packed parts is the
    packed join) and each layer's own tensors become views into the joined ones, so memory holds every
    weight once and the layers still work alone. Returns a :class:`JoinedProjection`. At batch 1 a
    decode step is ~150 small calls: fewer, larger ones do the same work with less overhead.
    """
    first = layers[0]
    if not all(isinstance(m, QuantizedLinear) and m._vnni is not None for m in layers):
        return None
    key = {(type(m), m.in_features, getattr(m, "group_size", None), m._vnni[1].dtype, m._isa) for m in layers}
    if len(key) != 1 or any(m.out_features % kernels.BLOCK_ROWS for m in layers):
        return None
    parts = [m._vnni[0] for m in layers]
    packed = torch.cat(parts, out=kernels.weight_buffer(sum(p.numel() for p in parts)))
    params = torch.cat([m._vnni[1] for m in layers])
    offsets = [0, 0]
    for m in layers:
        n_w, n_p = m._vnni[0].numel(), m._vnni[1].shape[0]
        m._vnni = (packed[offsets[0] : offsets[0] + n_w], params[offsets[1] : offsets[1] + n_p])
        offsets = [offsets[0] + n_w, offsets[1] + n_p]
    _, _, group, bits = first.vnni_matrix()  # type: ignore[misc]
    return JoinedProjection(
        packed, params, [m.out_features for m in layers], first.in_features, group, bits, first._isa
    )


class JoinedProjection:
    """``f(x) -> tuple of outputs`` for projections joined by :func:`joined_projection`; its packed
    matrix is also what the one-call decode step (:func:`mobillama.kernels.decode_layers`) reads."""

    def __init__(
        self,
        packed: torch.Tensor,
        params: torch.Tensor,
        sizes: list[int],
        in_features: int,
        group: int,
        bits: int,
        isa: str = "vnni",
    ):
        self.packed, self.params, self.sizes, self.group, self.bits = packed, params, sizes, group, bits
        self.isa = isa  # the kernel build that runs it (see QuantizedLinear.kernel_in_use)
        self.in_features, self.out_features = in_features, sum(sizes)

    def vnni_matrix(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(packed weight, params, group, bits), as :meth:`QuantizedLinear.vnni_matrix`."""
        return self.packed, self.params, self.group, self.bits

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = kernels.qlinear(x, self.packed, self.params, self.out_features, self.group, self.bits, self.isa)
        return y.to(x.dtype).split(self.sizes, dim=-1)


def _qmatrix(m) -> kernels.QMatrix:
    """The packed matrix of a vnni-packed layer or joined projection, as the one-call step reads it."""
    packed, params, group, bits = m.vnni_matrix()
    return kernels.qmatrix(packed, params, m.out_features, m.in_features, group, bits)


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The activation dtype: the embedding's (quantized layers keep integer weights), except fp32 when
    the project's int8/int4 kernels run the matmuls (they take and return fp32; no casts per call)."""
    if any(isinstance(m, QuantizedLinear) and m.kernel_in_use in PROJECT_KERNELS for m in model.modules()):
        return torch.float32
    return quant.embedding_dtype(model)


__all__ = ["FastDecoder", "JoinedProjection", "StaticKVCache", "compute_dtype", "joined_projection"]
