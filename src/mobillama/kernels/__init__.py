"""The project's own CPU kernels. For decode: int8/int4 x int8 matrix-vector products with AVX-512 VNNI
(``gemv_avx512.c``), a fused one-token attention step (``attention_avx512.c``), RMS norm and SwiGLU's
silu-times-up as one call each (``layer_avx512.c``), an AVX2 build of all of these for CPUs without
AVX-512 (``gemv_avx2.c``, ``layer_avx2.c``), and a whole decode step over either build (``decode_step.c``).
For training: causal attention forward and backward (``attention_train_avx512.c``; the autograd operator
is in :mod:`.causal_attention`).

Why they exist: see the head of each C file. The C files are compiled on first use with the system C compiler
(``cc``; gcc and clang both work) into ``~/.cache/mobillama/kernels`` and loaded with ``ctypes``: no torch
headers (a torch extension takes a minute to compile, this takes a second) and no build step at install.
The OpenMP runtime is the one torch already loaded (same soname), so the kernels share torch's threads
instead of starting a second pool that would spin against it.

:func:`available` says whether they can run here (x86-64 Linux with AVX-512 F/BW/VNNI, a compiler, and
``MOBILLAMA_KERNELS`` not set to ``0``); callers fall back to PyTorch's stock kernels when not.
:func:`matmul_isa` says which build of the matmul runs (``vnni``, or ``avx2`` on CPUs with AVX2 but no
AVX-512); ``MOBILLAMA_KERNEL_ISA=avx2`` makes a process run as on such a CPU (tests, benchmarks).

The code: :mod:`.build` compiles and caches the library, :mod:`.clib` loads it (ctypes signatures, the
decode-step structs; no torch), :mod:`.bindings` holds the calls on torch tensors, :mod:`.packing` lays
weights out for the matrix-vector kernel. This module re-exports their public names, so callers use
``mobillama.kernels.NAME`` whatever file it lives in; it imports each file on first use of one of its
names (PEP 562), so ``mobillama.kernels.clib`` loads in a process without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the file that defines it
_HOME = {
    "ACTIVATION_BLOCK": "clib",
    "DecodeLayer": "clib",
    "QMatrix": "clib",
    "activation_block": "clib",
    "params_bytes": "clib",
    "superblock_groups": "clib",
    "available": "clib",
    "matmul_isa": "clib",
    "matmul_unavailable_reason": "clib",
    "libc": "clib",
    "unavailable_reason": "clib",
    "attention_decode": "bindings",
    "attention_train_backward": "bindings",
    "attention_train_forward": "bindings",
    "bf16_linear": "bindings",
    "decode_layers": "bindings",
    "prefill_layers": "bindings",
    "projection_layout": "bindings",
    "qlinear": "bindings",
    "params_per": "bindings",
    "qmatrix": "bindings",
    "rmsnorm": "bindings",
    "silu_mul": "bindings",
    "HEADERS": "build",
    "REQUIRED_CPU_FLAGS": "build",
    "SOURCES": "build",
    "KernelUnavailable": "build",
    "cache_dir": "build",
    "BLOCK_ROWS": "packing",
    "HALF_MAX": "packing",
    "HUGE_PAGE": "packing",
    "pack_int4": "packing",
    "pack_int8": "packing",
    "params_fit": "packing",
    "weight_buffer": "packing",
    "_library": "clib",  # re-exported (as clib.load_library): tests clear its cache
}


def __getattr__(name: str) -> Any:
    """Import the file that defines ``name`` on its first use (see the module docstring)."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{home}")
    value = getattr(module, "load_library" if name == "_library" else name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))


__all__ = sorted(n for n in _HOME if not n.startswith("_"))
