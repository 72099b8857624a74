"""Weight-only quantization: int8 per output channel and int4 per group, with the shared FFN quantized once.

Two ``nn.Linear`` replacements, :class:`Int8Linear` and :class:`Int4Linear`, hold a *portable* form (the
one saved to safetensors) and run through PyTorch's CPU kernels when they apply:

- int8: ``weight`` int8 [N, K] and ``scales`` [N] (symmetric, w ≈ q * s). Kernels on CPU: the project's
  ``vnni`` kernel (:mod:`mobillama.kernels`, AVX-512 VNNI, activations quantized to int8 per block of 32 columns; memory-bound,
  the default where the CPU has it), ``aten._weight_int8pack_mm`` (weight-only, bf16 activations) or
  fbgemm's dynamic int8 ``quantized::linear_dynamic`` (activations quantized per call too).
- int4: ``weight`` uint8 [N, K/2] (two 4-bit values per byte, even column in the low nibble), ``scales``
  and ``zeros`` [N, K/G] (asymmetric, w ≈ (q - 8) * scale + zero, the tinygemm convention). Kernels on CPU:
  the ``vnni`` kernel (int8 activations per block of 32, as for int8), or the ``stock`` one,
  ``aten._weight_int4pack_mm_for_cpu`` after ``aten._convert_weight_to_int4pack_for_cpu`` (bf16
  activations; compute-bound at about half the memory roofline on a 2-core AVX-512 machine).

Anything else (another device, a shape the kernel rejects, ``kernel="reference"``) dequantizes and calls
``F.linear``: slower, same numbers. :func:`pack_for_inference` converts to the kernel layouts and frees the
portable tensors, so memory holds each weight once; a packed module can no longer be saved.

The model's FFNs live in ``model.model.ffns``; with ``ffn_sharing: all`` that is one module used by every
layer, so :func:`quantize_model` quantizes it once and the quantized state holds it once.

Quantized checkpoint directories are :mod:`mobillama.infer.quant_checkpoint`'s. (This module is a little
over the ~450-line guide: the two layer classes and the whole-model functions that know their private
kernel layouts belong together, so nothing outside reads those layouts.)
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mobillama import kernels
from mobillama.errors import MobiLlamaError

INT4_GROUP_SIZES = (32, 64, 128, 256)
INT8_KERNELS = ("auto", "vnni", "dynamic", "weight_only", "reference")
INT4_KERNELS = ("auto", "vnni", "stock", "reference")


def _fbgemm_available() -> bool:
    return any(e in torch.backends.quantized.supported_engines for e in ("fbgemm", "x86"))


def _use_vnni(kernel: str) -> bool:
    """``vnni`` asked for (an error if it cannot run here) or ``auto`` and it can run."""
    if kernel == "vnni":
        reason = kernels.unavailable_reason()
        if reason:
            raise MobiLlamaError(f"the vnni kernel cannot run here: {reason}")
        return True
    return kernel == "auto" and kernels.available()


class QuantizedLinear(nn.Module):
    """What both quantized layers share: the dequantizing fallback and the no-save-once-packed rule."""

    in_features: int
    out_features: int
    packed: bool
    _vnni: tuple[torch.Tensor, torch.Tensor] | None = None  # (packed weight bytes, params)

    def vnni_matrix(self) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
        """(packed weight, params, group, bits) where this layer runs on the vnni kernel, else None."""
        if self._vnni is None:
            return None
        bits = 8 if isinstance(self, Int8Linear) else 4
        return (*self._vnni, self.in_features if bits == 8 else self.group_size, bits)  # type: ignore[attr-defined]

    def _vnni_forward(self, x: torch.Tensor, group: int, bits: int) -> torch.Tensor:
        packed, params = self._vnni  # type: ignore[misc]
        return kernels.qlinear(x, packed, params, self.out_features, group, bits).to(x.dtype)

    @property
    def kernel_in_use(self) -> str:
        """The kernel this layer runs now (after packing): ``auto`` resolved per CPU, so a report can say
        what ran, not what was asked."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize and call F.linear: any device and dtype, slower, the numbers the kernels must match."""
        return F.linear(x, self.dequantize().to(x.dtype))

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if self.packed:
            raise MobiLlamaError(
                "a quantized model packed for inference cannot be saved; save it before packing"
            )
        super()._save_to_state_dict(destination, prefix, keep_vars)


class Int8Linear(QuantizedLinear):
    """y = x @ (q * s)^T with q int8 per output channel."""

    def __init__(self, in_features: int, out_features: int, kernel: str = "auto", device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        self.kernel = kernel
        self.packed = False
        self._dynamic = None  # fbgemm packed params (weight repacked once, portable weight freed)
        self._scales_cache: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "auto") -> Int8Linear:
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        q = (w / scales[:, None]).round().clamp(-128, 127).to(torch.int8)
        module = cls(linear.in_features, linear.out_features, kernel, device=w.device)
        module.weight, module.scales = q, scales
        return module

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales[:, None]

    def pack(self) -> None:
        """Repack for the vnni or fbgemm's dynamic kernel when chosen; the weight-only one needs none."""
        if self.weight.device.type != "cpu" or self.packed:
            return
        if _use_vnni(self.kernel) and self.in_features % 4 == 0:
            self._vnni = kernels.pack_int8(self.weight, self.scales)
            self.weight = torch.empty(0, dtype=torch.int8)
            self.packed = True
            return
        # fbgemm's dynamic int8 only when asked for: it quantizes a whole call's activations with ONE
        # scale, which on a real model's outlier-heavy activations over a long prompt costs ~3x perplexity
        # (SmolLM2-135M: 18.4 -> 57). Weight-only int8 (bf16 activations) keeps it within 0.3%.
        if self.kernel != "dynamic":
            return
        if not _fbgemm_available():
            raise MobiLlamaError("--int8-kernel dynamic needs PyTorch's fbgemm/x86 quantized engine")
        zero = torch.zeros(self.out_features, dtype=torch.int64)
        with (
            warnings.catch_warnings()
        ):  # quantized tensor creation is deprecated in 2.13; still the fbgemm API
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(self.weight, self.scales.double(), zero, 0)
            self._dynamic = torch.ops.quantized.linear_prepack(qweight, None)
        self.weight = torch.empty(0, dtype=torch.int8)
        self.packed = True

    def _kernel_scales(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._scales_cache:
            self._scales_cache[dtype] = self.scales.to(dtype)
        return self._scales_cache[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._vnni is not None and x.device.type == "cpu":
            return self._vnni_forward(x, self.in_features, 8)
        if self._dynamic is not None:
            # reduce_range: 7-bit activations, as fbgemm's own dynamic quantization uses (no overflow).
            return torch.ops.quantized.linear_dynamic(x.float(), self._dynamic, True).to(x.dtype)
        if (
            x.device.type == "cpu"
            and self.kernel != "reference"
            and x.dtype in (torch.bfloat16, torch.float32)
        ):
            shape = x.shape
            y = torch.ops.aten._weight_int8pack_mm(
                x.reshape(-1, self.in_features).contiguous(), self.weight, self._kernel_scales(x.dtype)
            )
            return y.reshape(*shape[:-1], self.out_features)
        return self.reference_forward(x)

    @property
    def kernel_in_use(self) -> str:
        if self._vnni is not None:
            return "vnni"
        if self._dynamic is not None:
            return "dynamic"
        return "reference" if self.kernel == "reference" else "weight_only"

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits=8, kernel={self.kernel}"


class Int4Linear(QuantizedLinear):
    """y = x @ W^T with W ≈ (q - 8) * scale + zero per group of ``group_size`` input columns."""

    def __init__(
        self, in_features: int, out_features: int, group_size: int, kernel: str = "auto", device=None
    ) -> None:
        super().__init__()
        if in_features % group_size or in_features % 2:
            raise MobiLlamaError(f"int4 group size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer(
            "weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.kernel = kernel
        self.packed = False
        self._kernel_weight: torch.Tensor | None = None
        self._scales_and_zeros: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, kernel: str = "auto") -> Int4Linear:
        w = linear.weight.detach().float()
        N, K = w.shape
        module = cls(K, N, group_size, kernel, device=w.device)
        wg = w.reshape(N, K // group_size, group_size)
        hi, lo = wg.amax(dim=-1), wg.amin(dim=-1)
        scales = ((hi - lo) / 15).clamp(min=1e-8)
        zeros = lo + scales * 8
        q = ((wg - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(N, K)
        module.weight = q[:, 0::2] | (q[:, 1::2] << 4)
        module.scales, module.zeros = scales, zeros
        return module

    def unpacked(self) -> torch.Tensor:
        """The 4-bit values as uint8 [N, K] in 0..15."""
        w = self.weight
        return torch.stack([w & 0x0F, w >> 4], dim=-1).reshape(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        q = self.unpacked().float().reshape(self.out_features, -1, self.group_size)
        w = (q - 8) * self.scales[..., None] + self.zeros[..., None]
        return w.reshape(self.out_features, self.in_features)

    def kernel_applies(self) -> bool:
        return self.out_features % 16 == 0 and self.group_size in INT4_GROUP_SIZES

    def pack(self) -> None:
        """Convert to the chosen CPU kernel's layout and free the portable nibbles."""
        if self.packed or self.weight.device.type != "cpu" or self.kernel == "reference":
            return
        if _use_vnni(self.kernel) and self.group_size % 8 == 0:
            self._vnni = kernels.pack_int4(self.unpacked(), self.scales, self.zeros, self.group_size)
            self.weight = torch.empty(0, dtype=torch.uint8)
            self.packed = True
            return
        if not self.kernel_applies():
            return
        self._kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            self.unpacked().to(torch.int32), 1
        )
        self._scales_and_zeros[torch.bfloat16] = self._kernel_qparams(torch.bfloat16)
        self.weight = torch.empty(0, dtype=torch.uint8)
        self.packed = True

    def _kernel_qparams(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._scales_and_zeros:
            sz = torch.stack([self.scales, self.zeros], dim=-1)  # [N, K/G, 2]
            self._scales_and_zeros[dtype] = sz.transpose(0, 1).contiguous().to(dtype)  # [K/G, N, 2]
        return self._scales_and_zeros[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._vnni is not None and x.device.type == "cpu":
            return self._vnni_forward(x, self.group_size, 4)
        if self._kernel_weight is not None:
            shape = x.shape
            # The kernel wants bf16 activations (fp32 runs 10-30x slower); compute in bf16, return x's dtype.
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous(),
                self._kernel_weight,
                self.group_size,
                self._kernel_qparams(torch.bfloat16),
            )
            return y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return self.reference_forward(x)

    @property
    def kernel_in_use(self) -> str:
        if self._vnni is not None:
            return "vnni"
        return "stock" if self._kernel_weight is not None else "reference"

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits=4, group_size={self.group_size}, "
            f"kernel={self.kernel}"
        )


class QuantizedEmbedding(nn.Module):
    """The input embedding of a tied model whose LM head is quantized: the head's matrix, read by rows.

    One quantized copy serves both, as in llama.cpp: the head runs it through its kernel, and a lookup
    gathers only the rows it needs (``weight``, ``scales``, ``zeros`` are the head's own portable tensors)
    and dequantizes them to ``dtype``, the same numbers as the head's :meth:`~QuantizedLinear.dequantize`.
    Once the head has repacked its weight for a kernel, the rows may be read from the checkpoint file
    instead (``rows``, a :class:`~mobillama.infer.load.FileRowEmbedding` over the stored rows, set by
    :func:`~mobillama.infer.load.serve_embedding_from_file`), so memory holds the matrix once.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        group_size: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        V, K = num_embeddings, embedding_dim
        if bits == 8:
            self.register_buffer("weight", torch.empty(V, K, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(V, dtype=torch.float32, device=device))
        else:
            groups = K // group_size  # type: ignore[operator]
            self.register_buffer("weight", torch.empty(V, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(V, groups, dtype=torch.float32, device=device))
            self.register_buffer("zeros", torch.empty(V, groups, dtype=torch.float32, device=device))
        self.rows: nn.Module | None = None

    @classmethod
    def tied_to(cls, head: QuantizedLinear, dtype: torch.dtype) -> QuantizedEmbedding:
        """An embedding sharing ``head``'s portable tensors (call before the head is packed)."""
        bits = 8 if isinstance(head, Int8Linear) else 4
        with torch.device("meta"):
            module = cls(head.out_features, head.in_features, bits, getattr(head, "group_size", None), dtype)
        for name in list(module._buffers):
            setattr(module, name, getattr(head, name))
        return module

    def share_with(self, head: QuantizedLinear) -> None:
        """Give ``head`` this embedding's tensors (the same objects: stored once, held once)."""
        for name in list(self._buffers):
            setattr(head, name, getattr(self, name))

    @property
    def row_bytes(self) -> int:
        """Bytes one lookup reads per token: the quantized row and its scales (and zeros)."""
        if self.bits == 8:
            return self.embedding_dim + self.scales.element_size()
        groups = self.embedding_dim // self.group_size  # type: ignore[operator]
        return self.embedding_dim // 2 + 2 * groups * self.scales.element_size()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.rows(ids) if self.rows is not None else self.weight[ids]
        if self.bits == 8:
            return (q.float() * self.scales[ids][..., None]).to(self.dtype)
        q = torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(*ids.shape, -1, self.group_size).float()
        w = (q - 8) * self.scales[ids][..., None] + self.zeros[ids][..., None]
        return w.reshape(*ids.shape, self.embedding_dim).to(self.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if self.rows is not None:
            raise MobiLlamaError(
                "this model reads its embedding rows from the checkpoint file (loaded for inference); "
                "load it with mobillama.infer.quant_checkpoint.load_quantized(pack=False) to save it"
            )
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        source = ", rows from file" if self.rows is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{group}{source}"


def embedding_dtype(model: nn.Module) -> torch.dtype:
    """The float dtype the input embedding returns (a quantized one dequantizes to its ``dtype``)."""
    embed = model.model.embed_tokens
    return embed.dtype if isinstance(embed, QuantizedEmbedding) else embed.weight.dtype


def embedding_row_bytes(model: nn.Module) -> int:
    """Bytes one token's embedding lookup reads."""
    embed = model.model.embed_tokens
    if isinstance(embed, QuantizedEmbedding):
        return embed.row_bytes
    return embed.weight.shape[1] * embed.weight.element_size()


# --------------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------------
def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the Linear layers that get quantized: attention, FFNs and the LM head (not embeddings)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


DEFAULT_INT4_GROUP = 32


def default_group_size(model: nn.Module) -> int:
    """Groups of 32 input columns (llama.cpp's Q4_0/Q4_1 block), the default for quality.

    Larger groups read fewer scale bytes but cost accuracy on real weights: on SmolLM2-135M (itself
    shipped as 4-bit in blocks of 32) group 64 raised perplexity by 34% where group 32 kept it within
    0.1%. ``--group-size 64/128`` trades that accuracy for speed explicitly.
    """
    sizes = {m.in_features for m in model.modules() if isinstance(m, nn.Linear)}
    if all(k % DEFAULT_INT4_GROUP == 0 for k in sizes):
        return DEFAULT_INT4_GROUP
    raise MobiLlamaError(
        f"int4 groups of {DEFAULT_INT4_GROUP} do not divide the layer input sizes {sorted(sizes)}"
    )


def check_bits(bits: Any, group_size: Any) -> None:
    if bits not in (4, 8) or isinstance(bits, bool):
        raise MobiLlamaError(f"bits must be 8 or 4, got {bits!r}")
    if group_size is not None:
        if bits == 8:
            raise MobiLlamaError("group size applies to int4 only (int8 is per output channel)")
        if group_size not in INT4_GROUP_SIZES:
            raise MobiLlamaError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")


def check_head_bits(bits: int, head_bits: Any) -> None:
    if head_bits is None or head_bits == bits:
        return
    if head_bits not in (4, 8) or isinstance(head_bits, bool):
        raise MobiLlamaError(f"head bits must be 8 or 4, got {head_bits!r}")
    if bits == 8:
        raise MobiLlamaError("an int4 LM head under an int8 body is not supported: use bits 4")


def check_kernels(int8_kernel: Any, int4_kernel: Any) -> None:
    if int8_kernel not in INT8_KERNELS:
        raise MobiLlamaError(f"int8 kernel must be one of {INT8_KERNELS}, got {int8_kernel!r}")
    if int4_kernel not in INT4_KERNELS:
        raise MobiLlamaError(f"int4 kernel must be one of {INT4_KERNELS}, got {int4_kernel!r}")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(
    model: nn.Module,
    bits: int,
    group_size: int | None = None,
    *,
    int8_kernel: str = "auto",
    int4_kernel: str = "auto",
    pack: bool = True,
    quantize_head: bool | None = None,
    head_bits: int | None = None,
) -> nn.Module:
    """Replace every Linear by its quantized version, in place; returns the model.

    A Linear object reached under several names (a shared FFN) is quantized once and the same quantized
    object is put back under every name. The full-precision weights are dropped as each layer is done,
    so peak memory stays near the original model's. ``pack`` prepares the CPU kernels (see module doc).

    ``quantize_head``: True quantizes the LM head, False keeps it in float; the default (None) quantizes an
    untied head and keeps a tied one, the embedding table, in float. A quantized tied head is quantized
    once and the embedding becomes a :class:`QuantizedEmbedding` over the same tensors (at batch 1 the
    head is most of the bytes a small model reads per token). Not the default because on the real
    SmolLM2-135M it cost +5.6% perplexity at int4 g32 and +0.15% at int8 (16 windows); an int8 head under
    an int4 body (``head_bits=8``) costs +0.2% and decoded ~1.1x faster there (docs/inference.md).

    ``head_bits``: the quantized head's bits (default ``bits``). 8 under an int4 body is llama.cpp's
    choice for its 4-bit files (the output matrix at 8 or 6 bits): half the bytes of a bf16 head at
    almost no cost in quality. An int4 head under an int8 body is refused.
    """
    check_bits(bits, group_size)
    check_head_bits(bits, head_bits)
    check_kernels(int8_kernel, int4_kernel)
    if bits == 4 and group_size is None:
        group_size = default_group_size(model)
    done: dict[int, nn.Module] = {}
    names = [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.Linear)]
    config = getattr(model, "config", None)
    tied = getattr(config, "tie_word_embeddings", False)
    if head_bits is not None and quantize_head is False:
        raise MobiLlamaError("head_bits quantizes the LM head; it cannot go with keeping the head in float")
    if quantize_head is None:
        quantize_head = head_bits is not None or not tied
    embed = model.model.embed_tokens if tied and quantize_head else None
    if not quantize_head:
        names = [n for n in names if n != "lm_head"]
    head_bits = head_bits or bits
    for name in names:
        linear = model.get_submodule(name)
        if id(linear) not in done:
            if (head_bits if name == "lm_head" else bits) == 8:
                done[id(linear)] = Int8Linear.from_linear(linear, int8_kernel)
            else:
                if linear.in_features % group_size:
                    raise MobiLlamaError(
                        f"int4 group size {group_size} does not divide {name}'s input size {linear.in_features}"
                    )
                done[id(linear)] = Int4Linear.from_linear(linear, group_size, int4_kernel)
        set_submodule(model, name, done[id(linear)])
    if embed is not None:  # the tied table: the head's quantized copy serves the lookups too
        model.model.embed_tokens = QuantizedEmbedding.tied_to(model.lm_head, embed.weight.dtype)
    model.quantization = {  # type: ignore[attr-defined]
        "bits": bits,
        "group_size": group_size,
        "modules": sorted(set(names)),
        "quantize_head": "lm_head" in names,
        "head_bits": head_bits if "lm_head" in names else None,
    }
    if pack:
        pack_for_inference(model)
    else:
        release_freed_memory()
    return model


def pack_for_inference(model: nn.Module) -> nn.Module:
    """Convert every quantized layer to its CPU kernel layout (once per object: a shared FFN once)."""
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.pack()
    release_freed_memory()
    return model


def release_freed_memory() -> None:
    """Hand memory freed by quantizing and packing back to the OS (glibc ``malloc_trim``).

    Converting layer by layer frees many multi-MB temporaries; glibc keeps such freed blocks in its heap
    (its mmap threshold grows after the first large free), so without this the process's resident size
    stays near its conversion peak for the rest of its life. A no-op where glibc is not the allocator.
    """
    c = kernels.libc()
    if c is not None and hasattr(c, "malloc_trim"):
        c.malloc_trim(0)


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
    key = {(type(m), m.in_features, getattr(m, "group_size", None)) for m in layers}
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
    return JoinedProjection(packed, params, [m.out_features for m in layers], group, bits)


class JoinedProjection:
    """``f(x) -> tuple of outputs`` for projections joined by :func:`joined_projection`; its packed
    matrix is also what the one-call decode step (:func:`mobillama.kernels.decode_layers`) reads."""

    def __init__(self, packed: torch.Tensor, params: torch.Tensor, sizes: list[int], group: int, bits: int):
        self.packed, self.params, self.sizes, self.group, self.bits = packed, params, sizes, group, bits
        self.out_features = sum(sizes)

    def vnni_matrix(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(packed weight, params, group, bits), as :meth:`QuantizedLinear.vnni_matrix`."""
        return self.packed, self.params, self.group, self.bits

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = kernels.qlinear(x, self.packed, self.params, self.out_features, self.group, self.bits)
        return y.to(x.dtype).split(self.sizes, dim=-1)


def kernels_in_use(model: nn.Module) -> str | None:
    """Which matmul kernels the quantized layers actually run (after packing), e.g. ``"vnni"`` or
    ``"weight_only"``; several joined by ``+`` when layers differ; None for an unquantized model. ``auto``
    resolves per CPU (the VNNI kernels need AVX-512), so a table must say what ran, not what was asked."""
    used = {m.kernel_in_use for m in model.modules() if isinstance(m, QuantizedLinear)}
    return "+".join(sorted(used)) or None


def quantized_module_count(model: nn.Module) -> int:
    """Distinct quantized layer objects (a shared FFN's three projections count three times, not 3 x L)."""
    return len({id(m) for m in model.modules() if isinstance(m, QuantizedLinear)})


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the unique parameters and buffers, in the layout currently held (kernel-packed included)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            # an expanded stand-in (a table read from the file, FileRowEmbedding) holds one value
            held = 1 if t.numel() and 0 in t.stride() else t.numel()
            total += held * t.element_size()
    for m in model.modules():
        if isinstance(m, QuantizedLinear) and m._vnni is not None and id(m) not in seen:
            seen.add(id(m))
            total += sum(t.numel() * t.element_size() for t in m._vnni)
        if isinstance(m, Int4Linear) and m._kernel_weight is not None and id(m) not in seen:
            seen.add(id(m))
            total += m._kernel_weight.numel() * m._kernel_weight.element_size()
        if isinstance(m, Int8Linear) and m._dynamic is not None and id(m) not in seen:
            seen.add(id(m))
            total += m.in_features * m.out_features  # fbgemm holds the int8 weights once, repacked
    return total


__all__ = [
    "INT4_GROUP_SIZES",
    "INT4_KERNELS",
    "INT8_KERNELS",
    "Int4Linear",
    "Int8Linear",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "check_bits",
    "check_head_bits",
    "check_kernels",
    "default_group_size",
    "embedding_dtype",
    "embedding_row_bytes",
    "joined_projection",
    "kernels_in_use",
    "pack_for_inference",
    "quantize_model",
    "quantized_module_count",
    "release_freed_memory",
    "set_submodule",
    "weight_bytes",
]
