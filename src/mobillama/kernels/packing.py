"""Weight packing for the int8/int4 matrix-vector kernel, done once at load time: rows in blocks of
:data:`BLOCK_ROWS`, in the order the kernel reads them, in buffers backed by huge pages."""

from __future__ import annotations

import contextlib
import ctypes
import sys

import torch

from mobillama.kernels.clib import libc, superblock_groups

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
    """int8 [N, K] and scales per row [N] or per group [N, K / group] (w = q * s) -> the kernel's weight
    bytes and params."""
    N, K = weight.shape
    if K % 4:
        raise ValueError(f"int8 kernel needs in_features divisible by 4, got {K}")
    rows = _pad_rows(weight).view(torch.uint8).reshape(-1, BLOCK_ROWS, K // 4, 4).permute(0, 2, 1, 3)
    packed = weight_buffer(rows.numel()).view(rows.shape)
    torch.bitwise_xor(rows, 0x80, out=packed)  # int8 -> q + 128 as uint8, written once in kernel order
    s = scales.float().reshape(N, -1)
    return packed.reshape(-1), _params(s, -128.0 * s)


def pack_int4(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes uint8 [N, K] in 0..15 with per-group scales/zeros [N, K/group] (w = (q - 8) * s + z).

    The params are compact (uint8 bytes: 8-bit codes and bf16 steps per super-block, see
    :func:`compact_params`) where the scales and offsets lie on that grid, as the quantizer puts them for
    groups of 32 and 64; else half floats (float16), as for checkpoints quantized before that layout."""
    N, K = codes.shape
    if K % group or group % 8:
        raise ValueError(f"int4 kernel needs a group size divisible by 8 that divides {K}, got {group}")
    q = (
        _pad_rows(codes).reshape(-1, BLOCK_ROWS, K // 8, 2, 4).permute(0, 2, 1, 3, 4)
    )  # [B, K/8, 16, lo/hi, 4]
    packed = weight_buffer(q[..., 0, :].numel()).view(q[..., 0, :].shape)
    torch.bitwise_or(q[..., 0, :], q[..., 1, :] << 4, out=packed)
    offsets = zeros - 8.0 * scales
    per = superblock_groups(K, group)
    params = compact_params(scales, offsets, per) if per else None
    return packed.reshape(-1), params if params is not None else _params(scales, offsets)


SCALE_CODES, OFFSET_CODES = 255, 127  # compact params: unsigned codes for scales, signed for offsets


def read_codes(values: torch.Tensor, per: int, top: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``values`` [N, G] as (steps [N, G / per], integer codes [N, G]) with values = step * code, one bf16
    step per row and run of ``per`` groups and codes within [-top, top], or None where they are not so.

    The quantizer stores the params as floats (the portable form); this finds the step each run was
    quantized with: the run's largest magnitude over a code near ``top`` that gives a bf16 step and
    integer codes (offsets come back as zero - 8 * scale, so "integer" allows fp32 rounding)."""
    N, G = values.shape
    v = values.float().reshape(N, G // per, per)
    vmax = v.abs().amax(dim=-1)
    steps = torch.zeros_like(vmax)
    found = vmax == 0
    for top_code in range(top, top // 2, -1):
        if bool(found.all()):
            break
        step = vmax / top_code
        codes = v / step[..., None]
        ok = (step.to(torch.bfloat16).float() == step) & ((codes - codes.round()).abs() <= 1e-3).all(-1)
        steps = torch.where(ok & ~found, step, steps)
        found |= ok
    if not bool(found.all()):
        return None
    codes = (v / torch.where(steps > 0, steps, 1.0)[..., None]).round()
    return steps, codes.reshape(N, G)


def compact_params(scales: torch.Tensor, offsets: torch.Tensor, per: int) -> torch.Tensor | None:
    """[N, G] scales and offsets -> the kernel's compact params (uint8), or None when they are not on the
    grid. Order per block of 16 rows and super-block of ``per`` groups: 16 bf16 scale steps, 16 bf16
    offset steps, then per group 16 uint8 scale codes and 16 int8 offset codes."""
    s, m = read_codes(scales, per, SCALE_CODES), read_codes(offsets, per, OFFSET_CODES)
    if s is None or m is None or bool((s[1] < 0).any()):
        return None
    N, G = scales.shape
    steps = _pad_rows(torch.stack([s[0], m[0]], dim=-1))  # [N', G / per, 2]
    steps = steps.reshape(-1, BLOCK_ROWS, G // per, 2).permute(0, 2, 3, 1).contiguous()  # [B, SB, 2, 16]
    steps = steps.to(torch.bfloat16).view(torch.uint8).reshape(*steps.shape[:2], 64)
    codes = torch.stack([s[1].to(torch.uint8), m[1].to(torch.int8).view(torch.uint8)], dim=-1)
    codes = _pad_rows(codes).reshape(-1, BLOCK_ROWS, G // per, per, 2).permute(0, 2, 3, 4, 1)
    codes = codes.reshape(*steps.shape[:2], per * 32)
    return torch.cat([steps, codes], dim=-1).reshape(-1)
