"""Weight-only quantization of a whole model: int8 per output channel or int4 per group, the shared FFN once.

:func:`quantize_model` replaces every ``nn.Linear`` (attention, FFNs and, by choice, the LM head) by its
quantized version from :mod:`mobillama.infer.quant_layers` (:class:`Int8Linear`, :class:`Int4Linear`), and a
tied embedding by :class:`~mobillama.infer.quant_embedding.QuantizedEmbedding` when the head is quantized.
:func:`pack_for_inference` converts every layer to its CPU kernel layout and frees the portable tensors, so
memory holds each weight once; a packed module can no longer be saved. The model's FFNs live in
``model.model.ffns``; with ``ffn_sharing: all`` that is one module used by every layer, so
:func:`quantize_model` quantizes it once and the quantized state holds it once.

Every public name of the layer and embedding modules is importable from here too. Quantized checkpoint
directories are :mod:`mobillama.infer.quant_checkpoint`'s; the joined q/k/v and gate/up projections the fast
decode path calls are :func:`mobillama.infer.decoder.joined_projection`.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from mobillama import kernels
from mobillama.errors import MobiLlamaError
from mobillama.infer.quant_embedding import QuantizedEmbedding, embedding_dtype, embedding_row_bytes
from mobillama.infer.quant_layers import (
    INT4_GROUP_SIZES,
    INT4_KERNELS,
    INT4_PARAMS,
    INT8_KERNELS,
    Int4Linear,
    Int8Linear,
    QuantizedLinear,
    check_int4_params,
)


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


INT8_GROUP_SIZES = (32, 64, 128, 256)


def check_int8_group(group: Any, bits: int, head_bits: Any) -> None:
    if group is None:
        return
    if group not in INT8_GROUP_SIZES or isinstance(group, bool):
        raise MobiLlamaError(f"int8 group size must be one of {INT8_GROUP_SIZES}, got {group!r}")
    if 8 not in (bits, head_bits):
        raise MobiLlamaError("an int8 group size needs int8 layers (bits 8, or head bits 8)")


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
    int4_params: str = "auto",
    int8_group_size: int | None = None,
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

    ``int4_params``: how the kernel holds int4 scales and offsets, ``INT4_PARAMS`` (the default "auto":
    8-bit codes in super-blocks, 7.5% fewer bytes a token at group 32, except for weights already on a
    half-float grid, such as a Q4_1 import, which keep it exactly).

    ``int8_group_size``: int8 layers (the body at ``bits=8``, an int8 head) get one scale per group of this
    many input columns instead of one per output channel: 32 is llama.cpp's Q8_0 grid (its int8 head
    under int4 layers reproduces the shipped SmolLM2 file's Q8_0 embedding). One more byte per 32
    weights in the kernel; without the vnni kernel such layers dequantize on each call (PyTorch's int8
    kernels take one scale per channel).
    """
    check_bits(bits, group_size)
    check_head_bits(bits, head_bits)
    check_kernels(int8_kernel, int4_kernel)
    check_int4_params(int4_params)
    check_int8_group(int8_group_size, bits, head_bits)
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
                if int8_group_size and linear.in_features % int8_group_size:
                    raise MobiLlamaError(
                        f"int8 group size {int8_group_size} does not divide {name}'s input size {linear.in_features}"
                    )
                done[id(linear)] = Int8Linear.from_linear(linear, int8_kernel, int8_group_size)
            else:
                if linear.in_features % group_size:
                    raise MobiLlamaError(
                        f"int4 group size {group_size} does not divide {name}'s input size {linear.in_features}"
                    )
                done[id(linear)] = Int4Linear.from_linear(linear, group_size, int4_kernel, int4_params)
        set_submodule(model, name, done[id(linear)])
    if embed is not None:  # the tied table: the head's quantized copy serves the lookups too
        model.model.embed_tokens = QuantizedEmbedding.tied_to(model.lm_head, embed.weight.dtype)
    model.quantization = {  # type: ignore[attr-defined]
        "bits": bits,
        "group_size": group_size,
        "modules": sorted(set(names)),
        "quantize_head": "lm_head" in names,
        "head_bits": head_bits if "lm_head" in names else None,
        "int4_params": int4_params if 4 in (bits, head_bits) else None,
        "int8_group_size": int8_group_size,
    }
    layouts = [getattr(m, "params_layout", None) for m in done.values() if isinstance(m, Int4Linear)]
    if layouts:  # what "auto" chose, layer by layer (a Q4_1 import keeps half floats)
        model.quantization["int4_params_layers"] = {k: layouts.count(k) for k in ("codes", "half")}  # type: ignore[attr-defined]
    if pack:
        pack_for_inference(model)
    else:
        release_freed_memory()
    return model


def pack_for_inference(model: nn.Module) -> nn.Module:
    """Convert every quantized layer to its CPU kernel layout (once per object: a shared FFN once).

    Says so on stderr when some layer found no kernel for its shape: it then dequantizes its weight on
    every call, which is correct but slow, and a user picking ``--bits``/``--group-size`` should know."""
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.pack()
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if isinstance(embed, QuantizedEmbedding):  # a tied quantized head: lookups from its packed matrix
        embed.read_rows_from_kernel(model.lm_head)
    release_freed_memory()
    slow = dequantizing_layers(model)
    if slow:
        print(
            f"warning: {slow} quantized layer(s) have no CPU kernel for their shape and dequantize their "
            "weights on every call (slow); another --group-size, --int4-kernel or (for int8 scales per group, "
            "which PyTorch's int8 kernels lack) a CPU with AVX-512 VNNI may avoid it",
            file=sys.stderr,
        )
    return model


def dequantizing_layers(model: nn.Module) -> int:
    """Distinct quantized CPU layers that fell back to dequantizing each call though a kernel was asked for
    (``auto``/``vnni``/``stock``...): the shape or the CPU did not suit it. ``reference`` asked for is not
    counted."""
    return len(
        {
            id(m)
            for m in model.modules()
            if isinstance(m, QuantizedLinear)
            and m.kernel != "reference"
            and m.kernel_in_use == "reference"
            and m.weight.device.type == "cpu"
        }
    )


def release_freed_memory() -> None:
    """Hand memory freed by quantizing and packing back to the OS (glibc ``malloc_trim``).

    Converting layer by layer frees many multi-MB temporaries; glibc keeps such freed blocks in its heap
    (its mmap threshold grows after the first large free), so without this the process's resident size
    stays near its conversion peak for the rest of its life. A no-op where glibc is not the allocator.
    """
    c = kernels.libc()
    if c is not None and hasattr(c, "malloc_trim"):
        c.malloc_trim(0)


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
    "INT4_PARAMS",
    "INT8_KERNELS",
    "Int4Linear",
    "Int8Linear",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "check_bits",
    "check_head_bits",
    "check_int4_params",
    "check_int8_group",
    "check_kernels",
    "default_group_size",
    "dequantizing_layers",
    "embedding_dtype",
    "embedding_row_bytes",
    "kernels_in_use",
    "pack_for_inference",
    "quantize_model",
    "quantized_module_count",
    "release_freed_memory",
    "set_submodule",
    "weight_bytes",
]
