"""The C library of the kernels as ctypes sees it, without PyTorch: loading it (each C function's
signature) and the structs the one-call decode step reads.

Why apart from :mod:`.bindings`: the lean runtime (:mod:`mobillama.infer.lean`) calls the same library
from a process that never imports torch (~0.22 GB resident on its own), so this module and :mod:`.build`
import only the standard library. In a process that has imported torch, the library's OpenMP runtime is
torch's (already loaded under the same soname); in a lean process it is the system's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

from mobillama.kernels.build import (
    AVX2_CPU_FLAGS,
    REQUIRED_CPU_FLAGS,
    KernelUnavailable,
    build_library,
    cpu_flags,
)


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL | None:
    """The C library, loaded once (for ``madvise`` and ``malloc_trim``); None where it cannot be found."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


ISA_ENV = "MOBILLAMA_KERNEL_ISA"  # "avx2": run as on a CPU without AVX-512 (tests, benchmarks)


def _reason(flags: tuple[str, ...]) -> str | None:
    if os.environ.get("MOBILLAMA_KERNELS", "1") == "0":
        return "disabled by MOBILLAMA_KERNELS=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs x86-64 Linux, this is {platform.system()} {platform.machine()}"
    missing = [f for f in flags if f not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    try:
        load_library()
    except KernelUnavailable as e:
        return str(e)
    return None


def unavailable_reason() -> str | None:
    """None when the AVX-512 kernels (all of them: matmuls, attention, the one-call decode step) can run
    here, else why not (one line)."""
    isa = os.environ.get(ISA_ENV, "")
    if isa not in ("", "avx512", "avx2"):
        return f"{ISA_ENV} must be avx512 or avx2, not {isa!r}"
    if isa == "avx2":
        return f"AVX-512 turned off by {ISA_ENV}=avx2"
    return _reason(REQUIRED_CPU_FLAGS)


def available() -> bool:
    return unavailable_reason() is None


def matmul_isa() -> str | None:
    """Which build of the int8/int4 matmul kernel runs here: ``"vnni"`` (AVX-512 VNNI), ``"avx2"`` (CPUs
    without AVX-512; the same layout and results, about half the speed per core), or None."""
    if available():
        return "vnni"
    if os.environ.get(ISA_ENV, "") in ("", "avx512", "avx2") and _reason(AVX2_CPU_FLAGS) is None:
        return "avx2"
    return None


def matmul_unavailable_reason() -> str | None:
    """None when :func:`matmul_isa` finds a build that runs here, else why not (one line)."""
    if matmul_isa():
        return None
    if os.environ.get(ISA_ENV, "") not in ("", "avx512", "avx2"):
        return unavailable_reason()  # the bad setting
    return _reason(AVX2_CPU_FLAGS) or unavailable_reason()


def kernel(name: str, isa: str) -> ctypes._CFuncPtr:
    """The library's function ``name`` in the build ``isa``: ``"vnni"`` (AVX-512; ``name`` itself) or
    ``"avx2"`` (``name + "_avx2"``, same arguments)."""
    return getattr(load_library(), name if isa == "vnni" else name + "_avx2")


@functools.lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL:
    """Compile (once per source version and compiler) and load the shared library."""
    lib = ctypes.CDLL(str(build_library()))
    lib.mb_qgemv.restype = ctypes.c_int
    lib.mb_qgemv.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
        ctypes.c_int,
    ]  # fmt: skip
    lib.mb_qmat_gemv.restype = ctypes.c_int
    lib.mb_qmat_gemv.argtypes = [
        ctypes.POINTER(QMatrix), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    lib.mb_rmsnorm.restype = None
    lib.mb_rmsnorm.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float,
        ctypes.c_void_p,
    ]  # fmt: skip
    lib.mb_silu_mul.restype = None
    lib.mb_silu_mul.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]  # fmt: skip
    lib.mb_attn_decode.restype = ctypes.c_int
    lib.mb_attn_decode.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
        ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    lib.mb_bf16_gemv.restype = None
    lib.mb_bf16_gemv.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    lib.mb_decode_layers.restype = ctypes.c_int
    lib.mb_decode_layers.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int,
    ]  # fmt: skip
    lib.mb_bf16_to_f32.restype = None
    lib.mb_bf16_to_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.mb_argmax.restype = ctypes.c_int64
    lib.mb_argmax.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.mb_sample.restype = ctypes.c_int64
    lib.mb_sample.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int64, ctypes.c_float, ctypes.c_double
    ]  # fmt: skip
    lib.mb_prefill_layers.restype = ctypes.c_int
    lib.mb_prefill_layers.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int,
    ]  # fmt: skip
    lib.mb_attn_train_fwd.restype = ctypes.c_int
    lib.mb_attn_train_fwd.argtypes = [
        *(ctypes.c_void_p, _Strides) * 4, ctypes.c_void_p, *[ctypes.c_int64] * 4, ctypes.c_float, ctypes.c_int,
    ]  # fmt: skip
    lib.mb_attn_train_bwd.restype = ctypes.c_int
    lib.mb_attn_train_bwd.argtypes = [
        *(ctypes.c_void_p, _Strides) * 5, ctypes.c_void_p, *(ctypes.c_void_p, _Strides) * 3,
        *[ctypes.c_int64] * 4, ctypes.c_float, ctypes.c_int,
    ]  # fmt: skip
    # the AVX2 builds take their AVX-512 twin's arguments
    for name in (
        "mb_qgemv",
        "mb_qmat_gemv",
        "mb_rmsnorm",
        "mb_bf16_gemv",
        "mb_decode_layers",
        "mb_prefill_layers",
    ):
        twin = getattr(lib, name + "_avx2")
        twin.restype, twin.argtypes = getattr(lib, name).restype, getattr(lib, name).argtypes
    return lib


class _Strides(ctypes.Structure):
    """Element strides of a [B, H, T, D] tensor along batch, head and token (D has unit stride)."""

    _fields_ = [("sb", ctypes.c_int64), ("sh", ctypes.c_int64), ("st", ctypes.c_int64)]


class QMatrix(ctypes.Structure):
    """A packed matrix for the one-call decode step (``mb_qmat`` in decode_step.c)."""

    _fields_ = [("w", ctypes.c_void_p), ("params", ctypes.c_void_p)] + [
        (n, ctypes.c_int64) for n in ("n", "group", "per", "bits", "ab")
    ]


class DecodeLayer(ctypes.Structure):
    """One layer's norms, matrices and cache for the one-call decode step (``mb_layer``)."""

    _fields_ = [
        ("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("norm_bf16", ctypes.c_int64),
        ("eps1", ctypes.c_float), ("eps2", ctypes.c_float),
        ("qkv", QMatrix), ("o", QMatrix), ("gate_up", QMatrix), ("down", QMatrix),
        ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
    ]  # fmt: skip


ACTIVATION_BLOCK = 32
SUPERBLOCK_COLUMNS = 256  # the compact int4 params' super-block, at most (llama.cpp's K-quants use 256 too)


@functools.cache
def superblock_groups(in_features: int, group: int) -> int:
    """Groups per super-block of compact int4 params (8-bit codes of the scales and offsets times one bf16
    step per row and super-block) for this shape, or 0 where that layout does not pay.

    Half-float params cost int4 g32 one bit a weight (5 in all); the codes cost half that, plus the steps
    (4.625 bits at 8 groups of 32), so a token streams 7.5% fewer bytes. A super-block of fewer than 4
    groups (groups of 128 and up) would save too little to be worth a second layout."""
    groups = in_features // group
    for per in range(min(SUPERBLOCK_COLUMNS // group, groups), 3, -1):
        if groups % per == 0:
            return per
    return 0


def params_bytes(rows: int, in_features: int, group: int, per: int) -> int:
    """Bytes of a packed matrix's params: per block of 16 rows, a 64-byte line of half floats per group, or
    for compact params (``per`` > 0) 64 bytes of steps and 32 of codes per group, per super-block."""
    groups, blocks = in_features // group, -(-rows // 16)
    return blocks * (groups // per * (64 + 32 * per) if per else groups * 64)


@functools.cache
def activation_block(group: int, bits: int) -> int:
    """Columns that share one int8 activation scale in :func:`qlinear`: 32 (llama.cpp's block) where the
    weight group allows it, else the largest of 16 / 8 / 4 that divides the group and the kernel's chunk
    (4 columns at int8, 8 at int4)."""
    chunk = 4 if bits == 8 else 8
    for block in (ACTIVATION_BLOCK, 16, 8, 4):
        if group % block == 0 and block % chunk == 0:
            return block
    raise ValueError(f"int{bits} kernel: group {group} is not a multiple of {chunk}")
