"""The quantized ``nn.Linear`` replacements: int8 per output channel and int4 per group, and their kernels.

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
``F.linear``: slower, same numbers. :func:`~mobillama.infer.quant.pack_for_inference` converts to the
kernel layouts and frees the portable tensors, so memory holds each weight once; a packed module can
no longer be saved.

A module apart from the whole-model job (:mod:`mobillama.infer.quant`) because the layers are what the
other quantization users build on: the embedding tied to a quantized head (:mod:`.quant_embedding`),
quantized checkpoints, and the fast decoder, which joins their packed matrices into one kernel call.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from mobillama import kernels
from mobillama.errors import MobiLlamaError
from mobillama.kernels.packing import OFFSET_CODES, SCALE_CODES

INT4_GROUP_SIZES = (32, 64, 128, 256)
INT8_KERNELS = ("auto", "vnni", "dynamic", "weight_only", "reference")
INT4_KERNELS = ("auto", "vnni", "stock", "reference")
# How int4 scales and offsets are held: "codes", 8-bit codes times a bf16 step per super-block of 256
# columns (groups of 32 and 64; 4.625 bits a weight at group 32), "half", half floats (5 bits at group 32,
# llama.cpp's Q4_1 grid), "auto", codes except for weights already on a half-float grid (a Q4_1 import).
INT4_PARAMS = ("auto", "codes", "half")


def check_int4_params(params: object) -> None:
    if params not in INT4_PARAMS:
        raise MobiLlamaError(f"int4 params must be one of {INT4_PARAMS}, got {params!r}")


# The smallest normal half float: scales below it would lose precision in the kernel's half-float params.
MIN_SCALE = 2.0**-14


def _half_exact(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to the nearest half float, kept in fp32, wherever it fits the half range.

    The vnni kernel stores scales and offsets as half floats (as llama.cpp's blocks do); choosing them
    representable at quantization time makes the saved checkpoint, the reference path and the kernel
    compute with the same weights. Values beyond the range stay as they are (that layer then stays off
    the kernel; see :func:`mobillama.kernels.params_fit`)."""
    return torch.where(t.abs() <= kernels.HALF_MAX, t.to(torch.float16).float(), t)


def _fbgemm_available() -> bool:
    return any(e in torch.backends.quantized.supported_engines for e in ("fbgemm", "x86"))


# What kernel_in_use says for the project's own matmul kernel: its AVX-512 VNNI build, or the AVX2 build
# for CPUs without AVX-512 (same packed layout, identical results; see gemv_avx2.c).
PROJECT_KERNELS = ("vnni", "avx2")


def _kernel_isa(kernel: str) -> str | None:
    """Which build of the project's kernel a layer asking for ``kernel`` runs: ``vnni`` asked for (an error
    if no build can run here) or ``auto`` where one can; None for the other kernels."""
    if kernel == "vnni":
        isa = kernels.matmul_isa()
        if isa is None:
            raise MobiLlamaError(f"the vnni kernel cannot run here: {kernels.matmul_unavailable_reason()}")
        return isa
    return kernels.matmul_isa() if kernel == "auto" else None


def _bf16_ceil(t: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= t (t > 0), in fp32."""
    bits = t.float().contiguous().view(torch.int32)
    up = ((bits & 0xFFFF) != 0).to(torch.int32)
    return ((bits & ~0xFFFF) + (up << 16)).view(torch.float32)


def _on_code_grid(values: torch.Tensor, per: int, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` [N, G] rounded onto ``step * code`` (the kernel's compact params): one bf16 step per row
    and run of ``per`` groups, the run's largest magnitude over ``top``; integer codes in [1, 255] for
    scales (``top`` 255, the step rounded up so the largest group keeps its range) or [-127, 127] for
    offsets. Returns (values on the grid, the step of each value's run, broadcast to [N, G])."""
    N, G = values.shape
    v = values.float().reshape(N, G // per, per)
    vmax = v.abs().amax(dim=-1, keepdim=True)
    if top == SCALE_CODES:
        step = _bf16_ceil(vmax / top)
        codes = (v / step).round().clamp(1, top)
    else:
        step = (vmax / top).to(torch.bfloat16).float()
        codes = (v / torch.where(step > 0, step, 1.0)).round().clamp(-top, top)
    largest = v.abs().argmax(dim=-1, keepdim=True)  # exactly +-top, whatever the rounding of the step
    codes.scatter_(-1, largest, top * torch.sign(v.gather(-1, largest)))
    return (codes * step).reshape(N, G), step.expand(N, G // per, per).reshape(N, G)


ROWS_PER_SEARCH = 4096


def _on_grid(wg: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> bool:
    """Whether the groups ``wg`` [N, G, group] are exactly ``q * scale + offset`` with 4-bit q (to fp32
    rounding): weights dequantized from a file that stored them so (llama.cpp's Q4_1 at group 32)."""
    q = ((wg - offsets[..., None]) / scales[..., None]).round().clamp(0, 15)
    error = (q * scales[..., None] + offsets[..., None] - wg).abs().amax()
    return bool(error <= 1e-5 * wg.abs().amax().clamp(min=1e-30))


def _compact_scales_and_offsets(
    wg: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, per: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and offsets of the groups ``wg`` [N, G, group] on the compact params' grid: per group, the
    codes next to the rounded ones (+-1 each) whose re-coded weights have the least squared error.

    Rounding the min-max scale and offset alone cost SmolLM2-135M (shipped in Q4_1) 0.7% perplexity over
    half-float params; the search brings it to 0.3%, the shipped file's own perplexity."""
    if len(wg) > ROWS_PER_SEARCH:  # bounds the search's temporaries (a vocab-sized head: ~0.3 GB each)
        parts = [
            _compact_scales_and_offsets(*(t[i : i + ROWS_PER_SEARCH] for t in (wg, scales, offsets)), per)
            for i in range(0, len(wg), ROWS_PER_SEARCH)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    s_grid, s_step = _on_code_grid(scales, per, SCALE_CODES)
    m_grid, m_step = _on_code_grid(offsets, per, OFFSET_CODES)
    best_err = torch.full(scales.shape, float("inf"))
    best_s, best_m = s_grid, m_grid
    for ds in (-1, 0, 1):
        s = ((s_grid / s_step).round() + ds).clamp(1, SCALE_CODES) * s_step
        for dm in (-1, 0, 1):
            m = ((m_grid / torch.where(m_step > 0, m_step, 1.0)).round() + dm).clamp(
                -OFFSET_CODES, OFFSET_CODES
            )
            m = m * m_step
            q = ((wg - m[..., None]) / s[..., None]).round().clamp(0, 15)
            err = ((q * s[..., None] + m[..., None] - wg) ** 2).sum(dim=-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
    return best_s, best_m


class QuantizedLinear(nn.Module):
    """What both quantized layers share: the dequantizing fallback and the no-save-once-packed rule."""

    in_features: int
    out_features: int
    packed: bool
    _vnni: tuple[torch.Tensor, torch.Tensor] | None = None  # (packed weight bytes, params)
    _isa: str = "vnni"  # the kernel build that runs _vnni: "vnni" or "avx2"

    def vnni_matrix(self) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
        """(packed weight, params, group, bits) where this layer runs on the project's kernel, else None."""
        if self._vnni is None:
            return None
        bits = 8 if isinstance(self, Int8Linear) else 4
        return (*self._vnni, self.group_size or self.in_features, bits)  # type: ignore[attr-defined]

    def _vnni_forward(self, x: torch.Tensor, group: int, bits: int) -> torch.Tensor:
        packed, params = self._vnni  # type: ignore[misc]
        return kernels.qlinear(x, packed, params, self.out_features, group, bits, self._isa).to(x.dtype)

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
    """y = x @ (q * s)^T with q int8 and one scale per output channel, or per group of ``group_size``
    input columns (llama.cpp's Q8_0 grid at 32: scales [N, K / group])."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel: str = "auto",
        device=None,
        group_size: int | None = None,
    ) -> None:
        super().__init__()
        if group_size is not None and (group_size % 4 or in_features % group_size):
            raise MobiLlamaError(f"int8 group size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("scales", torch.empty(shape, dtype=torch.float32, device=device))
        self.kernel = kernel
        self.packed = False
        self._dynamic = None  # fbgemm packed params (weight repacked once, portable weight freed)
        self._scales_cache: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, kernel: str = "auto", group_size: int | None = None
    ) -> Int8Linear:
        w = linear.weight.detach().float()
        module = cls(linear.in_features, linear.out_features, kernel, device=w.device, group_size=group_size)
        N, K = w.shape
        wg = w.reshape(N, -1, group_size or K)
        scales = _half_exact((wg.abs().amax(dim=-1) / 127.0).clamp(min=MIN_SCALE))
        q = (wg / scales[..., None]).round().clamp(-128, 127).to(torch.int8).reshape(N, K)
        module.weight, module.scales = q, scales if group_size else scales[:, 0]
        return module

    def _group_scales(self) -> torch.Tensor:
        """The scales as [N, groups] (one group per row when per channel)."""
        return self.scales.reshape(self.out_features, -1)

    def dequantize(self) -> torch.Tensor:
        q = self.weight.float().reshape(self.out_features, self._group_scales().shape[1], -1)
        return (q * self._group_scales()[..., None]).reshape(self.out_features, self.in_features)

    def pack(self) -> None:
        """Repack for the vnni or fbgemm's dynamic kernel when chosen; the weight-only one needs none."""
        if self.weight.device.type != "cpu" or self.packed:
            return
        isa = _kernel_isa(self.kernel)
        if isa and self.in_features % 4 == 0 and kernels.params_fit(128.0 * self.scales):
            self._vnni, self._isa = kernels.pack_int8(self.weight, self._group_scales()), isa
            self.weight = torch.empty(0, dtype=torch.int8)
            self.packed = True
            return
        if self.group_size is not None:
            return  # PyTorch's int8 kernels take one scale per channel: per group, the reference path
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
            return self._vnni_forward(x, self.group_size or self.in_features, 8)
        if self._dynamic is not None:
            # reduce_range: 7-bit activations, as fbgemm's own dynamic quantization uses (no overflow).
            return torch.ops.quantized.linear_dynamic(x.float(), self._dynamic, True).to(x.dtype)
        if (
            x.device.type == "cpu"
            and self.kernel != "reference"
            and self.group_size is None
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
            return self._isa
        if self._dynamic is not None:
            return "dynamic"
        return "reference" if self.kernel == "reference" or self.group_size is not None else "weight_only"

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in={self.in_features}, out={self.out_features}, bits=8{group}, kernel={self.kernel}"


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
    def from_linear(
        cls, linear: nn.Linear, group_size: int, kernel: str = "auto", params: str = "auto"
    ) -> Int4Linear:
        """Quantize ``linear`` per group of ``group_size`` columns (min-max, asymmetric). ``params``: how
        the kernel will hold each group's scale and offset (see :data:`INT4_PARAMS`)."""
        check_int4_params(params)
        w = linear.weight.detach().float()
        N, K = w.shape
        module = cls(K, N, group_size, kernel, device=w.device)
        wg = w.reshape(N, K // group_size, group_size)
        hi, lo = wg.amax(dim=-1), wg.amin(dim=-1)
        # w = q * scale + offset with q in 0..15, zero = offset + 8 scale; the scale and offset on the grid
        # of the kernel's params: 8-bit codes in super-blocks, or half floats
        scales = ((hi - lo) / 15).clamp(min=MIN_SCALE)
        per = kernels.superblock_groups(K, group_size) if params != "half" else 0
        half_scales, half_offsets = _half_exact(scales), _half_exact(lo)
        if per and params == "auto" and _on_grid(wg, half_scales, half_offsets):
            per = 0  # weights that came from a half-float grid (a Q4_1 file): kept exactly
        if per:
            scales, offsets = _compact_scales_and_offsets(wg, scales, lo, per)
        else:
            scales, offsets = half_scales, half_offsets
        module.params_layout = "codes" if per else "half"
        zeros = offsets + scales * 8
        q = ((wg - offsets[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(N, K)
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
        isa = _kernel_isa(self.kernel)
        if (
            isa
            and self.group_size % 8 == 0
            and kernels.params_fit(self.scales, self.zeros - 8.0 * self.scales)
        ):
            self._vnni = kernels.pack_int4(self.unpacked(), self.scales, self.zeros, self.group_size)
            self._isa = isa
            # the kernel's params carry the scales and zeros: keeping the portable ones too would hold
            # 8 more bytes per group of weights (+33% at group 32). A tied embedding keeps its own references.
            self.weight = torch.empty(0, dtype=torch.uint8)
            self.scales = torch.empty(0, dtype=torch.float32)
            self.zeros = torch.empty(0, dtype=torch.float32)
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
            return self._isa
        return "stock" if self._kernel_weight is not None else "reference"

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits=4, group_size={self.group_size}, "
            f"kernel={self.kernel}"
        )
