"""The project's own CPU kernels. For decode: int8/int4 x int8 matrix-vector products with AVX-512 VNNI
(``gemv_avx512.c``), a fused one-token attention step (``attention_avx512.c``), and RMS norm and
SwiGLU's silu-times-up as one call each (``layer_avx512.c``). For training: causal attention forward and
backward (``attention_train_avx512.c``; the autograd operator is in :mod:`.causal_attention`).

Why they exist: see the head of each C file. The C files are compiled on first use with the system C compiler
(``cc``; gcc and clang both work) into ``~/.cache/mobillama/kernels`` and loaded with ``ctypes``: no torch
headers (a torch extension takes a minute to compile, this takes a second) and no build step at install.
The OpenMP runtime is the one torch already loaded (same soname), so the kernels share torch's threads
instead of starting a second pool that would spin against it.

:func:`available` says whether they can run here (x86-64 Linux with AVX-512 F/BW/VNNI, a compiler, and
``MOBILLAMA_KERNELS`` not set to ``0``); callers fall back to PyTorch's stock kernels when not.

The code: :mod:`.build` compiles and caches the library, :mod:`.bindings` loads it (ctypes signatures) and
holds the Python calls, :mod:`.packing` lays weights out for the matrix-vector kernel. This module
re-exports their public names, so callers use ``mobillama.kernels.NAME`` whatever file it lives in.
"""

from __future__ import annotations

from mobillama.kernels.bindings import (
    ACTIVATION_BLOCK,
    DecodeLayer,
    QMatrix,
    activation_block,
    attention_decode,
    attention_train_backward,
    attention_train_forward,
    available,
    bf16_linear,
    decode_layers,
    libc,
    projection_layout,
    qlinear,
    qmatrix,
    rmsnorm,
    silu_mul,
    unavailable_reason,
)
from mobillama.kernels.bindings import _library as _library  # re-exported: tests clear its cache
from mobillama.kernels.build import HEADERS, REQUIRED_CPU_FLAGS, SOURCES, KernelUnavailable, cache_dir
from mobillama.kernels.packing import (
    BLOCK_ROWS,
    HALF_MAX,
    HUGE_PAGE,
    pack_int4,
    pack_int8,
    params_fit,
    weight_buffer,
)

__all__ = [
    "bf16_linear",
    "DecodeLayer",
    "QMatrix",
    "decode_layers",
    "qmatrix",
    "ACTIVATION_BLOCK",
    "activation_block",
    "BLOCK_ROWS",
    "HEADERS",
    "HALF_MAX",
    "HUGE_PAGE",
    "REQUIRED_CPU_FLAGS",
    "SOURCES",
    "KernelUnavailable",
    "attention_decode",
    "attention_train_backward",
    "attention_train_forward",
    "available",
    "cache_dir",
    "libc",
    "pack_int4",
    "pack_int8",
    "params_fit",
    "projection_layout",
    "qlinear",
    "rmsnorm",
    "silu_mul",
    "unavailable_reason",
    "weight_buffer",
]
