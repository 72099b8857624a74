"""Weight packing for the int8/int4 matrix-vector kernel, done once at load time: rows in blocks of
:data:`BLOCK_ROWS`, in the order the kernel reads them, in buffers backed by huge pages."""

from __future__ import annotations

import contextlib
import ctypes
import sys

import torch

from mobillama.kernels.clib import libc

BLOCK_ROWS = 16
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


HALF_MAX = 65504.0


def params_fit(*tensors: torch.Tensor) -> bool:
    """Whether scales / offsets fit the kernel's half-float params (|v| <= 65504): true of any trained
    model's weights; a layer whose quantization scales do not fit stays off the kernel."""
    return all(bool(t.numel() == 0 or t.float().abs().max() <= HALF_MAX) for t in tensors)


def _params(scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[N, G] scales and offsets -> [blocks, G, 2, 16] half floats, the kernel's order (one 64-byte line
    per block of rows and group)."""
    if not params_fit(scales, offsets):
        raise ValueError(f"quantization scales or offsets exceed the half-float range ({HALF_MAX:g})")
    s = _pad_rows(scales.float()).reshape(-1, BLOCK_ROWS, scales.shape[1]).permute(0, 2, 1)
    m = _pad_rows(offsets.float()).reshape(-1, BLOCK_ROWS, offsets.shape[1]).permute(0, 2, 1)
    return torch.stack([s, m], dim=2).to(torch.float16).contiguous()


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
    return packed.reshape(-1), _params(scales, zeros - 8.0 * scales)
