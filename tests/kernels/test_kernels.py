"""The project's CPU kernels (AVX-512 VNNI int8/int4 matmuls and the fused decode attention) against
plain PyTorch, and the way they report that they cannot run."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from mobillama import kernels
from mobillama.errors import MobiLlamaError
from mobillama.infer.decoder import joined_projection
from mobillama.infer.quant import Int4Linear, Int8Linear
from mobillama.model import rotate_half

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason=f"CPU kernels cannot run here: {kernels.unavailable_reason()}"
)


def _fake_quantized_activations(x: torch.Tensor, block: int = kernels.ACTIVATION_BLOCK) -> torch.Tensor:
    """What the kernels do to activations: symmetric int8 per block of 32 columns, round to nearest even."""
    blocks = x.unflatten(-1, (-1, block))
    scale = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
    return ((blocks / scale).round().clamp(-127, 127) * scale).flatten(-2)


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows, cols, batch", [(40, 64, 1), (96, 128, 3), (16, 256, 5), (1000, 512, 2)])
def test_matmul_equals_the_dequantized_reference_on_int8_activations(bits, rows, cols, batch):
    torch.manual_seed(rows + cols)
    linear = torch.nn.Linear(cols, rows, bias=False)
    x = torch.randn(batch, 2, cols)
    q = Int8Linear.from_linear(linear, "vnni") if bits == 8 else Int4Linear.from_linear(linear, 32, "vnni")
    expected = q.reference_forward(_fake_quantized_activations(x))  # before packing frees the weights
    q.pack()
    assert q.packed and q._vnni is not None and q.weight.numel() == 0
    out = q(x)
    assert out.shape == (batch, 2, rows) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert q(x.bfloat16()).dtype == torch.bfloat16  # the caller's dtype comes back


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
def test_an_outlier_channel_only_coarsens_its_own_block(bits):
    """Real activations have a few channels far larger than the rest; one scale per token would round
    every other channel to a few levels. One scale per block of 32 confines that to the outlier's block:
    1 block of 32 coarse instead of all 32, so about sqrt(32) = 5.7x less error."""
    torch.manual_seed(3)
    linear = torch.nn.Linear(1024, 64, bias=False)
    x = torch.randn(4, 1024)
    x[:, 5] = 300.0
    exact = linear(x).detach()
    q = Int8Linear.from_linear(linear, "vnni") if bits == 8 else Int4Linear.from_linear(linear, 32, "vnni")
    weights_only = q.reference_forward(x)  # the weight error alone
    per_token = q.reference_forward(_fake_quantized_activations(x, 1024))
    q.pack()
    out = q(x)
    kernel_error = (out - weights_only).norm() / exact.norm()
    per_token_error = (per_token - weights_only).norm() / exact.norm()
    assert kernel_error * 3 < per_token_error


@needs_kernels
@pytest.mark.parametrize("bits, group, block", [(8, 72, 8), (8, 44, 4), (4, 40, 8), (4, 96, 32)])
def test_groups_that_32_does_not_divide_use_a_smaller_activation_block(bits, group, block):
    assert kernels.activation_block(group, bits) == block
    torch.manual_seed(group)
    cols = group if bits == 8 else 2 * group
    linear = torch.nn.Linear(cols, 24, bias=False)
    x = torch.randn(3, cols)
    q = Int8Linear.from_linear(linear, "vnni") if bits == 8 else Int4Linear.from_linear(linear, group, "vnni")
    expected = q.reference_forward(_fake_quantized_activations(x, block))
    q.pack()
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("bits, group", [(8, None), (4, 128)])
def test_params_are_half_floats_that_the_portable_form_holds_exactly(bits, group):
    """The kernel's scales and offsets are half floats (one 64-byte line per 16 rows and group, as
    llama.cpp's blocks store theirs): quantization picks them representable, so the saved checkpoint,
    the reference path and the kernel use the same weights."""
    torch.manual_seed(bits)
    linear = torch.nn.Linear(256, 48, bias=False)
    q = Int8Linear.from_linear(linear, "vnni") if bits == 8 else Int4Linear.from_linear(linear, group, "vnni")
    tensors = [q.scales] if bits == 8 else [q.scales, q.zeros - 8 * q.scales]
    for t in tensors:
        assert torch.equal(t, t.half().float())
    q.pack()
    packed, params = q._vnni
    assert params.dtype == torch.float16
    groups = 1 if bits == 8 else 256 // group
    assert params.numel() == 3 * groups * 2 * 16  # 48 rows = 3 blocks of 16, a scale and an offset each


@needs_kernels
@pytest.mark.parametrize("cols, group, per", [(256, 32, 8), (576, 32, 6), (512, 64, 4)])
def test_int4_params_are_8_bit_codes_in_super_blocks_where_they_pay(cols, group, per):
    """Groups of 32 and 64: each scale and offset is an 8-bit code times a bf16 step per row and
    super-block, exactly in the portable form, so the kernel's compact params (half the bytes of half
    floats) hold the same weights; the kernel equals the reference on the same activations."""
    torch.manual_seed(cols)
    linear = torch.nn.Linear(cols, 40, bias=False)
    q = Int4Linear.from_linear(linear, group, "vnni")
    assert kernels.superblock_groups(cols, group) == per
    for values, top in ((q.scales, 255), (q.zeros - 8 * q.scales, 127)):
        steps, codes = kernels.packing.read_codes(values, per, top)
        assert steps.shape == (40, cols // group // per) and torch.equal(steps, steps.bfloat16().float())
        assert torch.equal(codes, codes.round()) and codes.abs().max() <= top
        torch.testing.assert_close(steps.repeat_interleave(per, dim=1) * codes, values, rtol=1e-6, atol=0)
    assert (q.scales > 0).all()
    w = linear.weight.detach()
    # one half step of its own group at most (the search may pick a finer scale that clips a little more)
    assert ((q.dequantize() - w).norm() / w.norm()) < 0.1
    x = torch.randn(3, cols)
    expected = q.reference_forward(_fake_quantized_activations(x))
    q.pack()
    packed, params = q._vnni
    assert params.dtype == torch.uint8
    assert (
        params.numel()
        == kernels.params_bytes(40, cols, group, per)
        == 3 * (cols // group // per) * (64 + 32 * per)
    )
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)


def test_compact_params_are_not_read_into_params_that_are_off_their_grid():
    """Half-float scales of an older checkpoint are not codes times a bf16 step: they stay half floats."""
    torch.manual_seed(0)
    scales = (torch.rand(16, 8) * 0.01 + 1e-3).half().float()
    assert kernels.packing.compact_params(scales, -8 * scales, 8) is None
    assert (
        kernels.pack_int4(torch.zeros(16, 256, dtype=torch.uint8), scales, 0 * scales, 32)[1].dtype
        == torch.float16
    )


@pytest.mark.parametrize("bits", [8, 4])
def test_weights_beyond_the_half_range_stay_off_the_kernel_and_stay_exact(bits):
    """A scale past 65504 cannot be a kernel param: the layer keeps a PyTorch path, with its numbers."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        linear.weight[3, 5] = 1e7 if bits == 8 else 1e6  # int8: scale 7.9e4; int4 (range / 15): 6.7e4
    q = Int8Linear.from_linear(linear, "auto") if bits == 8 else Int4Linear.from_linear(linear, 32, "auto")
    assert not kernels.params_fit(*([128 * q.scales] if bits == 8 else [q.scales, q.zeros - 8 * q.scales]))
    x = torch.randn(2, 64)
    expected = q.reference_forward(x)
    q.pack()
    assert q.kernel_in_use != "vnni"
    torch.testing.assert_close(q(x), expected, rtol=2e-2, atol=1e-2 * expected.abs().max().item())
    with pytest.raises(ValueError, match="half-float range"):
        kernels.pack_int8(torch.zeros(16, 64, dtype=torch.int8), torch.full((16,), 1e5))


@needs_kernels
def test_zero_and_huge_activations_stay_finite_and_exact():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    q = Int8Linear.from_linear(linear, "vnni")
    x = torch.zeros(2, 64)
    x[1] = 1e30  # a row of equal huge values is quantized to 127 * 1e30/127 exactly
    expected = q.reference_forward(_fake_quantized_activations(x))
    q.pack()
    out = q(x)
    assert torch.equal(out[0], torch.zeros(32))
    assert torch.isfinite(out[1]).all()
    torch.testing.assert_close(out[1], expected[1], rtol=1e-3, atol=0)  # sums of ~1e30 terms


@needs_kernels
def test_joined_projection_is_exact_and_keeps_one_copy_of_the_weights():
    torch.manual_seed(1)
    parts = [Int4Linear.from_linear(torch.nn.Linear(128, n, bias=False), 64, "vnni") for n in (64, 32, 32)]
    for p in parts:
        p.pack()
    x = torch.randn(1, 1, 128)
    alone = [p(x) for p in parts]
    project = joined_projection(parts)
    assert project is not None
    for joined, single, part in zip(project(x), alone, parts, strict=True):
        assert torch.equal(joined, single)
        assert torch.equal(part(x), single)  # each part still works, now through views
    storages = {p._vnni[0].untyped_storage().data_ptr() for p in parts}
    assert len(storages) == 1
    mixed = [parts[0], Int8Linear.from_linear(torch.nn.Linear(128, 16, bias=False), "vnni")]
    mixed[1].pack()
    assert joined_projection(mixed) is None  # int4 and int8 cannot share a call


@needs_kernels
@pytest.mark.parametrize(("rows", "cols", "batch"), [(1000, 576, 1), (33, 1000, 2), (5, 7, 3), (64, 48, 1)])
def test_bf16_linear_is_the_fp32_product_of_the_stored_weights(rows, cols, batch):
    torch.manual_seed(rows)
    weight = torch.randn(rows, cols).bfloat16()
    x = torch.randn(batch, cols)
    out = kernels.bf16_linear(x, weight)
    assert out.shape == (batch, rows) and out.dtype == torch.float32
    torch.testing.assert_close(out, x @ weight.float().T, rtol=1e-5, atol=1e-4)  # fp32 sums, other order
    assert kernels.bf16_linear(x[None], weight).shape == (1, batch, rows)


@needs_kernels
def test_bf16_linear_refuses_weights_it_cannot_read():
    x = torch.randn(1, 8)
    for bad in (torch.randn(4, 8), torch.randn(8, 4).bfloat16().T, torch.randn(2, 4, 8).bfloat16()):
        with pytest.raises(ValueError, match="contiguous 2-D bf16 weight"):
            kernels.bf16_linear(x, bad)


def _reference_attention(q, k, v, cos, sin, k_cache, v_cache, slot, valid):
    B, Hkv, S, D = k_cache.shape
    H = q.shape[-1] // D
    q = q.view(B, H, 1, D)
    k = k.reshape(B, Hkv, 1, D)
    c, s = cos[:, None, None], sin[:, None, None]
    q, k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    k_cache[:, :, slot] = k[:, :, 0]  # rounded to the cache's dtype, as the kernel writes it
    v_cache[:, :, slot] = v.reshape(B, Hkv, D)
    mask = None if valid is None else valid[:, None, None, : slot + 1]
    keys, values = k_cache[:, :, : slot + 1].float(), v_cache[:, :, : slot + 1].float()
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=Hkv != H)
    return out.reshape(B, H * D), k_cache, v_cache


@needs_kernels
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "B, H, Hkv, D, slot",
    [(1, 4, 4, 64, 0), (1, 4, 4, 64, 37), (2, 4, 2, 128, 20), (3, 2, 1, 16, 5), (1, 2, 2, 48, 70)],
)
def test_fused_decode_attention_equals_rope_cache_write_and_sdpa(B, H, Hkv, D, slot, cache_dtype):
    torch.manual_seed(slot + D)
    S = slot + 9
    qkv = torch.randn(B, (H + 2 * Hkv) * D)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)  # column slices, as the decoder passes them
    cos, sin = torch.randn(B, D), torch.randn(B, D)
    k_cache = torch.randn(B, Hkv, S, D).to(cache_dtype)
    v_cache = torch.randn(B, Hkv, S, D).to(cache_dtype)
    valid = torch.ones(B, S, dtype=torch.bool)
    if B > 1:
        valid[1, :3] = False  # a left-padded row never attends to its padding
    expected, k_want, v_want = _reference_attention(q, k, v, cos, sin, k_cache, v_cache, slot, valid)
    out = kernels.attention_decode(q, k, v, cos, sin, k_cache, v_cache, slot, valid)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the rotated key: fp32 math in a different order, so at most one rounding step apart in bf16
    torch.testing.assert_close(
        k_cache.float(), k_want.float(), rtol=0, atol=1e-6 if cache_dtype == torch.float32 else 2e-2
    )
    assert torch.equal(v_cache, v_want)  # values are rounded exactly as torch rounds them


@needs_kernels
def test_attention_rejects_layouts_it_cannot_read():
    k_cache = torch.zeros(1, 2, 8, 16)
    good = torch.zeros(1, 32)
    with pytest.raises(ValueError, match="fp32"):
        kernels.attention_decode(
            good.bfloat16(), good, good, good[:, :16], good[:, :16], k_cache, k_cache, 0, None
        )
    with pytest.raises(ValueError, match="both be fp32 or both bf16"):
        kernels.attention_decode(
            good, good, good, good[:, :16], good[:, :16], k_cache, k_cache.bfloat16(), 0, None
        )
    with pytest.raises(ValueError, match="unit column stride"):
        kernels.attention_decode(
            torch.zeros(1, 64)[:, ::2], good, good, good[:, :16], good[:, :16], k_cache, k_cache, 0, None
        )


@needs_kernels
@pytest.mark.parametrize("dim", [16, 64, 70])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_the_model_norm(dim, weight_dtype):
    from mobillama.model import RMSNorm

    torch.manual_seed(dim)
    norm = RMSNorm(dim, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim))
    norm = norm.to(weight_dtype)
    x = torch.randn(3, 2, dim) * 5
    torch.testing.assert_close(kernels.rmsnorm(x, norm.weight, norm.eps), norm(x), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("n", [16, 70, 176])
def test_silu_mul_on_the_halves_of_one_output_equals_torch(n):
    torch.manual_seed(n)
    joined = torch.randn(2, 3, 2 * n) * 10  # large values: exp over- and underflow stay correct
    gate, up = joined.split([n, n], dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate, up), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_elementwise_kernels_reject_what_they_cannot_read():
    with pytest.raises(ValueError, match="fp32"):
        kernels.rmsnorm(torch.zeros(2, 16, dtype=torch.bfloat16), torch.ones(16), 1e-5)
    with pytest.raises(ValueError, match="same shape"):
        kernels.silu_mul(torch.zeros(2, 16), torch.zeros(2, 32)[:, :16].contiguous()[:1])


def test_weight_buffers_are_huge_page_aligned_and_hold_what_is_written():
    small = kernels.weight_buffer(1000)
    assert small.shape == (1000,) and small.dtype == torch.uint8
    big = kernels.weight_buffer(5 * kernels.HUGE_PAGE + 123)
    assert big.shape == (5 * kernels.HUGE_PAGE + 123,) and big.is_contiguous()
    if sys.platform.startswith("linux"):
        assert big.data_ptr() % kernels.HUGE_PAGE == 0
    big.copy_(torch.arange(big.numel()) % 251)
    assert torch.equal(big[-5:], (torch.arange(big.numel() - 5, big.numel()) % 251).to(torch.uint8))


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """Kernels built from scratch into a temporary cache, and the cached library forgotten after."""
    monkeypatch.setenv("MOBILLAMA_CACHE", str(tmp_path))
    kernels._library.cache_clear()
    yield tmp_path
    kernels._library.cache_clear()


def test_disabled_kernels_say_so_and_explicit_requests_fail_clearly(monkeypatch, fresh_build):
    monkeypatch.setenv("MOBILLAMA_KERNELS", "0")
    assert not kernels.available()
    assert "MOBILLAMA_KERNELS=0" in kernels.unavailable_reason()
    q = Int8Linear.from_linear(torch.nn.Linear(64, 16, bias=False), "vnni")
    with pytest.raises(MobiLlamaError, match="vnni kernel cannot run here: disabled"):
        q.pack()
    auto = Int4Linear.from_linear(torch.nn.Linear(64, 16, bias=False), 32, "auto")
    auto.pack()  # auto falls back to PyTorch's stock kernel
    assert auto._vnni is None and auto._kernel_weight is not None


def test_a_failing_compiler_is_reported_in_one_line(monkeypatch, fresh_build):
    monkeypatch.setenv("CC", "false")  # a 'compiler' that always fails
    reason = kernels.unavailable_reason()
    if reason and "lacks" in reason:
        pytest.skip("this CPU lacks the instructions, so no build is attempted")
    assert reason is not None and "building the CPU kernels with false failed" in reason
    assert "\n" not in reason
    assert not list(fresh_build.rglob("*.so"))  # no partial library left behind


@needs_kernels
def test_the_library_is_built_once_into_the_cache(fresh_build):
    assert kernels.available()
    built = list((fresh_build / "kernels").glob("mobillama_kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    kernels._library.cache_clear()
    assert kernels.available()
    assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
