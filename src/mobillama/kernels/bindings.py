"""The PyTorch side of the CPU kernels: the calls that check their tensors and hand them to the library
(one-line ``ValueError`` for a tensor the C code cannot read). The library itself, its signatures and
structs are :mod:`.clib`'s (no torch there, for the lean runtime)."""

from __future__ import annotations

import ctypes

import torch

from mobillama.kernels.clib import QMatrix, _Strides, activation_block, superblock_groups
from mobillama.kernels.clib import kernel as _kernel
from mobillama.kernels.clib import load_library as _library


# --------------------------------------------------------------------------------------------------
# The calls
# --------------------------------------------------------------------------------------------------
def _matmul_buffers(x: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] as contiguous fp32 rows [M, K] (a copy only where needed) and an fp32 output [M, N]."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    return x2, torch.empty(x2.shape[0], out_features, dtype=torch.float32)


def qlinear(
    x: torch.Tensor,
    packed: torch.Tensor,
    params: torch.Tensor,
    out_features: int,
    group: int,
    bits: int,
    isa: str = "vnni",
) -> torch.Tensor:
    """y = x @ W^T for weights packed by :func:`pack_int8` / :func:`pack_int4`; fp32 out, x's shape.
    ``isa``: which build runs it, ``"vnni"`` or ``"avx2"`` (:func:`matmul_isa`; identical results).

    Kept lean: at one token a decode step makes ~90 of these calls, so each microsecond here counts."""
    x2, y = _matmul_buffers(x, out_features)
    M, K = x2.shape
    if _kernel("mb_qgemv", isa)(
        x2.data_ptr(), M, K, packed.data_ptr(), params.data_ptr(), out_features, group,
        params_per(params, K, group), bits, activation_block(group, bits), y.data_ptr(), torch.get_num_threads(),
    ):  # fmt: skip
        raise MemoryError(f"int{bits} kernel: could not allocate {M} x {K} activation buffers")
    return y.view(*x.shape[:-1], out_features)


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, isa: str = "vnni") -> torch.Tensor:
    """y = x @ W^T for fp32 rows x [..., K] and a contiguous bf16 weight [N, K]; fp32 out (see
    ``mb_bf16_gemv``: the weights widened exactly, fp32 arithmetic). ``isa``: ``"vnni"`` runs the AVX-512
    build, ``"avx2"`` the AVX2 one (same products, summed in another order)."""
    if weight.dtype != torch.bfloat16 or not weight.is_contiguous() or weight.dim() != 2:
        raise ValueError("bf16_linear needs a contiguous 2-D bf16 weight")
    N = weight.shape[0]
    x2, y = _matmul_buffers(x, N)
    M, K = x2.shape
    _kernel("mb_bf16_gemv", isa)(
        x2.data_ptr(), M, K, weight.data_ptr(), N, y.data_ptr(), torch.get_num_threads()
    )
    return y.view(*x.shape[:-1], N)


def params_per(params: torch.Tensor, in_features: int, group: int) -> int:
    """The kernel's ``per`` for packed params: groups per super-block of compact int4 params (bytes, as
    :func:`pack_int4` writes them where the scales allow), 0 for half-float params."""
    return superblock_groups(in_features, group) if params.dtype == torch.uint8 else 0


def qmatrix(
    packed: torch.Tensor, params: torch.Tensor, out_features: int, in_features: int, group: int, bits: int
) -> QMatrix:
    """The :class:`QMatrix` of weights packed by :func:`pack_int8` / :func:`pack_int4` (the tensors must
    outlive it: it holds their addresses only)."""
    per = params_per(params, in_features, group)
    return QMatrix(
        packed.data_ptr(), params.data_ptr(), out_features, group, per, bits, activation_block(group, bits)
    )


def decode_layers(
    x: torch.Tensor,
    layers: ctypes.Array,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_len: int,
    slot: int,
    valid: torch.Tensor | None,
    cache_bf16: bool,
    heads: tuple[int, int, int],
    intermediate: int,
    isa: str = "vnni",
) -> torch.Tensor:
    """One decode step through every layer in one call (see decode_step.c): ``x`` [B, hidden] fp32
    contiguous is updated in place and returned. ``layers``: an array of :class:`DecodeLayer`; ``cos`` /
    ``sin`` [B, head_dim] fp32 contiguous; ``valid`` [B, cache_len] uint8 or None; ``heads`` = (H, Hkv, D);
    ``isa``: the kernels' build, ``"vnni"`` (AVX-512) or ``"avx2"`` (:func:`matmul_isa`)."""
    H, Hkv, D = heads
    B, hidden = x.shape
    rc = _kernel("mb_decode_layers", isa)(
        x.data_ptr(), B, hidden, ctypes.addressof(layers), len(layers), cos.data_ptr(), sin.data_ptr(),
        cache_len, slot, None if valid is None else valid.data_ptr(), cache_bf16, H, Hkv, D, intermediate,
        D**-0.5, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("decode step: could not allocate its activation buffers")
    return x


def prefill_layers(
    x: torch.Tensor,
    layers: ctypes.Array,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_len: int,
    first: int,
    cache_bf16: bool,
    heads: tuple[int, int, int],
    intermediate: int,
    isa: str = "vnni",
) -> torch.Tensor:
    """A prompt of one sequence through every layer in one call (``mb_prefill_layers``): ``x`` [T, hidden]
    fp32 contiguous, the tokens of slots ``first .. first+T-1``, is updated in place and returned; ``cos`` /
    ``sin`` [T, head_dim] fp32 contiguous. Equal to T calls of :func:`decode_layers` (same ``isa``), one
    token each."""
    H, Hkv, D = heads
    T, hidden = x.shape
    rc = _kernel("mb_prefill_layers", isa)(
        x.data_ptr(), T, hidden, ctypes.addressof(layers), len(layers), cos.data_ptr(), sin.data_ptr(),
        cache_len, first, cache_bf16, H, Hkv, D, intermediate, D**-0.5, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("prefill: could not allocate its activation buffers")
    return x


def _fp32_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dtype != torch.float32 or x.stride(-1) != 1:
        raise ValueError(f"{name} must be fp32 with unit column stride")
    return x


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, isa: str = "vnni") -> torch.Tensor:
    """RMS norm of fp32 rows (any leading shape, contiguous) with an fp32 or bf16 weight; fp32 out.
    ``isa``: the AVX-512 build (``"vnni"``) or the AVX2 one."""
    _fp32_rows(x, "x")
    if not x.is_contiguous() or weight.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError("rmsnorm needs contiguous fp32 rows and an fp32 or bf16 weight")
    weight = weight.contiguous()
    D = x.shape[-1]
    out = torch.empty_like(x)
    _kernel("mb_rmsnorm", isa)(
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
