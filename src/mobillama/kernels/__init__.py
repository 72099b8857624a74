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
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCES = [
    Path(__file__).with_name(n)
    for n in ("gemv_avx512.c", "attention_avx512.c", "attention_train_avx512.c", "layer_avx512.c")
]
HEADERS = [Path(__file__).with_name("simd_math.h")]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")
BLOCK_ROWS = 16


class KernelUnavailable(RuntimeError):
    """Raised when the kernels were asked for explicitly but cannot run on this machine."""


def cache_dir() -> Path:
    root = os.environ.get("MOBILLAMA_CACHE") or Path.home() / ".cache" / "mobillama"
    return Path(root) / "kernels"


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL | None:
    """The C library, loaded once (for ``madvise`` and ``malloc_trim``); None where it cannot be found."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def unavailable_reason() -> str | None:
    """None when the kernels can run here, else why not (one line)."""
    if os.environ.get("MOBILLAMA_KERNELS", "1") == "0":
        return "disabled by MOBILLAMA_KERNELS=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs x86-64 Linux, this is {platform.system()} {platform.machine()}"
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    try:
        _library()
    except KernelUnavailable as e:
        return str(e)
    return None


def available() -> bool:
    return unavailable_reason() is None


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    """Compile (once per source version and compiler) and load the shared library."""
    compiler = _compiler()
    if compiler is None:
        raise KernelUnavailable("no C compiler (cc, gcc or clang) found to build the CPU kernels")
    digest = hashlib.sha256(compiler.encode())
    for source in [*SOURCES, *HEADERS]:
        digest.update(source.read_bytes())
    target = cache_dir() / f"mobillama_kernels-{digest.hexdigest()[:16]}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            cmd = [compiler, "-O3", "-std=c11", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                   "-mfma", "-fopenmp", "-fPIC", "-shared", *map(str, SOURCES), "-o", str(built)]  # fmt: skip
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                first = (result.stderr.strip().splitlines() or ["(no output)"])[0]
                raise KernelUnavailable(f"building the CPU kernels with {compiler} failed: {first}")
            os.replace(built, target)  # atomic: a concurrent build leaves one complete file
    torch.get_num_threads()  # make sure torch's OpenMP runtime is the one loaded first
    lib = ctypes.CDLL(str(target))
    lib.mb_qgemv.restype = ctypes.c_int
    lib.mb_qgemv.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
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
    lib.mb_attn_train_fwd.restype = ctypes.c_int
    lib.mb_attn_train_fwd.argtypes = [
        *(ctypes.c_void_p, _Strides) * 4, ctypes.c_void_p, *[ctypes.c_int64] * 4, ctypes.c_float, ctypes.c_int,
    ]  # fmt: skip
    lib.mb_attn_train_bwd.restype = ctypes.c_int
    lib.mb_attn_train_bwd.argtypes = [
        *(ctypes.c_void_p, _Strides) * 5, ctypes.c_void_p, *(ctypes.c_void_p, _Strides) * 3,
        *[ctypes.c_int64] * 4, ctypes.c_float, ctypes.c_int,
    ]  # fmt: skip
    return lib


class _Strides(ctypes.Structure):
    """Element strides of a [B, H, T, D] tensor along batch, head and token (D has unit stride)."""

    _fields_ = [("sb", ctypes.c_int64), ("sh", ctypes.c_int64), ("st", ctypes.c_int64)]


# --------------------------------------------------------------------------------------------------
# Packing (once, at load time)
# --------------------------------------------------------------------------------------------------
HUGE_PAGE = 2 << 20


def weight_buffer(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 buffer for packed weights, backed by 2 MB pages where Linux allows it.

    Decode streams every weight once per token; with 4 KB pages that is ~300k TLB misses per token at
    int8 and the hardware prefetchers stop at each page boundary. Transparent huge pages, asked for with
    ``madvise(MADV_HUGEPAGE)`` before the first write, made a whole int8 decode's matmuls ~16% faster
    here (43.8 -> 36.8 ms, median of 7). Costs at most 2 MB of untouched address space per buffer.
    """
    if nbytes < HUGE_PAGE or not sys.platform.startswith("linux"):
        return torch.empty(nbytes, dtype=torch.uint8)
    base = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -base.data_ptr() % HUGE_PAGE
    buffer = base[start : start + nbytes]  # keeps ``base`` alive through its storage
    c = libc()
    if c is not None:
        with contextlib.suppress(AttributeError):
            c.madvise(ctypes.c_void_p(buffer.data_ptr()), ctypes.c_size_t(nbytes // 4096 * 4096), 14)
    return buffer


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    pad = -t.shape[0] % BLOCK_ROWS
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t


def _params(scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[N, G] scales and offsets -> [blocks, G, 2, 16] floats, the kernel's order."""
    s = _pad_rows(scales.float()).reshape(-1, BLOCK_ROWS, scales.shape[1]).permute(0, 2, 1)
    m = _pad_rows(offsets.float()).reshape(-1, BLOCK_ROWS, offsets.shape[1]).permute(0, 2, 1)
    return torch.stack([s, m], dim=2).contiguous()


def pack_int8(weight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [N, K] and per-row scales [N] (w = q * s) -> the kernel's weight bytes and params."""
    N, K = weight.shape
    if K % 4:
        raise ValueError(f"int8 kernel needs in_features divisible by 4, got {K}")
    rows = _pad_rows(weight).view(torch.uint8).reshape(-1, BLOCK_ROWS, K // 4, 4).permute(0, 2, 1, 3)
    packed = weight_buffer(rows.numel()).view(rows.shape)
    torch.bitwise_xor(rows, 0x80, out=packed)  # int8 -> q + 128 as uint8, written once in kernel order
    s = scales.float()[:, None]
    return packed.reshape(-1), _params(s, -128.0 * s)


def pack_int4(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes uint8 [N, K] in 0..15 with per-group scales/zeros [N, K/group] (w = (q - 8) * s + z)."""
    N, K = codes.shape
    if K % group or group % 8:
        raise ValueError(f"int4 kernel needs a group size divisible by 8 that divides {K}, got {group}")
    q = (
        _pad_rows(codes).reshape(-1, BLOCK_ROWS, K // 8, 2, 4).permute(0, 2, 1, 3, 4)
    )  # [B, K/8, 16, lo/hi, 4]
    packed = weight_buffer(q[..., 0, :].numel()).view(q[..., 0, :].shape)
    torch.bitwise_or(q[..., 0, :], q[..., 1, :] << 4, out=packed)
    # The kernel sums 16 x each group's dot product (see block_int4): scales are stored divided by 16.
    return packed.reshape(-1), _params(scales / 16.0, zeros - 8.0 * scales)


# --------------------------------------------------------------------------------------------------
# The call
# --------------------------------------------------------------------------------------------------
def qlinear(
    x: torch.Tensor, packed: torch.Tensor, params: torch.Tensor, out_features: int, group: int, bits: int
) -> torch.Tensor:
    """y = x @ W^T for weights packed by :func:`pack_int8` / :func:`pack_int4`; fp32 out, x's shape.

    Kept lean: at one token a decode step makes ~90 of these calls, so each microsecond here counts."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    M = x2.shape[0]
    y = torch.empty(M, out_features, dtype=torch.float32)
    if _library().mb_qgemv(
        x2.data_ptr(), M, K, packed.data_ptr(), params.data_ptr(), out_features, group, bits,
        y.data_ptr(), torch.get_num_threads(),
    ):  # fmt: skip
        raise MemoryError(f"int{bits} kernel: could not allocate {M} x {K} activation buffers")
    return y.view(*x.shape[:-1], out_features)


def _fp32_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dtype != torch.float32 or x.stride(-1) != 1:
        raise ValueError(f"{name} must be fp32 with unit column stride")
    return x


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm of fp32 rows (any leading shape, contiguous) with an fp32 or bf16 weight; fp32 out."""
    _fp32_rows(x, "x")
    if not x.is_contiguous() or weight.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError("rmsnorm needs contiguous fp32 rows and an fp32 or bf16 weight")
    weight = weight.contiguous()
    D = x.shape[-1]
    out = torch.empty_like(x)
    _library().mb_rmsnorm(
        x.data_ptr(),
        x.numel() // D,
        D,
        weight.data_ptr(),
        weight.dtype == torch.bfloat16,
        eps,
        out.data_ptr(),
    )
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for fp32 [..., N] rows sharing one row stride (e.g. halves of one gate|up output)."""
    g2, u2 = (
        _fp32_rows(gate, "gate").reshape(-1, gate.shape[-1]),
        _fp32_rows(up, "up").reshape(-1, up.shape[-1]),
    )
    if g2.shape != u2.shape or g2.stride(0) != u2.stride(0):
        raise ValueError("gate and up must have the same shape and row stride")
    M, N = g2.shape
    out = torch.empty(*gate.shape, dtype=torch.float32)
    _library().mb_silu_mul(g2.data_ptr(), u2.data_ptr(), g2.stride(0), M, N, out.data_ptr())
    return out


def attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: int,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """One-token attention for every row: rotary on q [B, H*D] and k [B, Hkv*D], k/v [B, Hkv*D] written
    to the caches [B, Hkv, S, D] at ``slot``, attention over slots 0..slot (those ``valid`` [B, S] allows).
    q, k, v fp32 on the CPU (they may be column slices of one [B, (H+2Hkv)*D] tensor); the caches fp32 or
    bf16 (both the same; arithmetic is fp32 either way). Returns [B, H*D] fp32."""
    B, Hkv, S, D = k_cache.shape
    H = q.shape[-1] // D
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != torch.float32 or t.stride(-1) != 1 or t.dim() != 2:
            raise ValueError(f"{name} must be a [B, heads*D] fp32 tensor with unit column stride")
    if k.stride(0) != v.stride(0) or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k and v must share a row stride and the caches must be contiguous")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError("the caches must both be fp32 or both bf16")
    out = torch.empty(B, H * D, dtype=torch.float32)
    valid_u8 = None if valid is None else valid.to(torch.uint8).contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()  # named: a temporary would be freed
    rc = _library().mb_attn_decode(
        q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), k.stride(0),
        cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.dtype == torch.bfloat16, S, slot, None if valid_u8 is None else valid_u8.data_ptr(), B, H, Hkv, D, D**-0.5,
        out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("attention kernel: could not allocate its score buffers")
    return out


def _bhtd(t: torch.Tensor, name: str) -> tuple[int, _Strides]:
    if t.dtype != torch.float32 or t.dim() != 4 or t.stride(-1) != 1:
        raise ValueError(f"{name} must be a [B, H, T, D] fp32 tensor with unit stride along D")
    return t.data_ptr(), _Strides(t.stride(0), t.stride(1), t.stride(2))


def projection_layout(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An empty tensor of ``t``'s [B, H, T, D] shape stored as [B, T, H, D] (how the projections lay out
    q, k, v, so the attention output reshapes to [B, T, H*D] without a copy)."""
    B, H, T, D = t.shape
    return t.new_empty(B, T, H, D, dtype=dtype).transpose(1, 2)


def attention_train_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax(q k^T / sqrt(D)) v for fp32 [B, H, T, D] q, k, v (any batch/head/token strides);
    returns the output (stored [B, T, H, D]) and the rows' log-sum-exp [B, H, T] for the backward."""
    _bhtd(q, "q")  # one-line error for a tensor that is not [B, H, T, D] fp32 with unit stride along D
    B, H, T, D = q.shape
    if k.shape != q.shape or v.shape != q.shape or D % 16:
        raise ValueError(f"q, k, v must share one [B, H, T, D] shape with D a multiple of 16, got {q.shape}")
    out = projection_layout(q)
    lse = torch.empty(B, H, T, dtype=torch.float32)
    rc = _library().mb_attn_train_fwd(
        *_bhtd(q, "q"), *_bhtd(k, "k"), *_bhtd(v, "v"), *_bhtd(out, "out"), lse.data_ptr(),
        B, H, T, D, D**-0.5, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("attention kernel: could not allocate its per-head buffers")
    return out, lse


def attention_train_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`attention_train_forward` with respect to q, k, v, given the output's gradient."""
    _bhtd(q, "q")  # one-line error for a tensor that is not [B, H, T, D] fp32 with unit stride along D
    B, H, T, D = q.shape
    if any(t.shape != q.shape for t in (k, v, out, dout)) or D % 16:
        raise ValueError(
            f"{q.shape}: q, k, v, out, dout must share one [B, H, T, D] shape with D a multiple of 16"
        )
    if lse.shape != (B, H, T) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be the forward's fp32 [B, H, T] = {[B, H, T]} log-sum-exp")
    dq, dk, dv = projection_layout(q), projection_layout(k), projection_layout(v)
    lse = lse.contiguous()  # named: a temporary's memory would be freed before the call
    rc = _library().mb_attn_train_bwd(
        *_bhtd(q, "q"), *_bhtd(k, "k"), *_bhtd(v, "v"), *_bhtd(out, "out"), *_bhtd(dout, "dout"),
        lse.data_ptr(), *_bhtd(dq, "dq"), *_bhtd(dk, "dk"), *_bhtd(dv, "dv"),
        B, H, T, D, D**-0.5, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("attention kernel: could not allocate its per-head buffers")
    return dq, dk, dv


__all__ = [
    "attention_train_backward",
    "attention_train_forward",
    "attention_decode",
    "rmsnorm",
    "weight_buffer",
    "silu_mul",
    "KernelUnavailable",
    "available",
    "pack_int4",
    "pack_int8",
    "qlinear",
    "unavailable_reason",
]
