"""The AVX2 build of the int8/int4 matmul kernel (CPUs without AVX-512): the same bits as the VNNI build on
the same packed weights, chosen where AVX-512 is missing, and running a whole model there.

This machine class has AVX-512, so "a CPU without it" is simulated two ways: ``MOBILLAMA_KERNEL_ISA=avx2``
(every AVX-512 kernel off, as the project runs on such a CPU) and CPU flags without the AVX-512 ones.
What no test here can show is a run on real AVX2-only silicon; the disassembly check below is the
guarantee that the AVX2 build holds no AVX-512 instruction."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from mobillama import kernels
from mobillama.errors import MobiLlamaError
from mobillama.infer.quant import Int4Linear, Int8Linear
from mobillama.kernels import clib

needs_avx2 = pytest.mark.skipif(
    clib._reason(kernels.build.AVX2_CPU_FLAGS) is not None, reason="the AVX2 kernel cannot run here"
)
needs_both = pytest.mark.skipif(not kernels.available(), reason="no AVX-512 VNNI build to compare with")


def _gemv(name: str, x: torch.Tensor, packed, params, n: int, group: int, bits: int) -> torch.Tensor:
    M, K = x.shape
    y = torch.full((M, n), float("nan"))
    per = kernels.params_per(params, K, group)
    fn = getattr(kernels._library(), name)
    assert fn(x.data_ptr(), M, K, packed.data_ptr(), params.data_ptr(), n, group, per, bits,
              kernels.activation_block(group, bits), y.data_ptr(), 2) == 0  # fmt: skip
    return y


CASES = [  # bits, in, out, group (None: int8 per channel), int4 params, batch
    (4, 512, 40, 32, "codes", 1),
    (4, 576, 33, 32, "codes", 2),  # 6 groups a super-block, rows not a multiple of 16
    (4, 512, 17, 64, "codes", 3),
    (4, 512, 40, 32, "half", 2),
    (4, 1024, 48, 128, "auto", 1),
    (4, 96, 20, 32, "half", 1),
    (4, 64, 16, 16, "half", 2),  # activation block 16
    (8, 512, 40, 32, None, 2),
    (8, 300, 24, None, None, 1),  # per channel, 300 = 9 blocks of 32 + 12: activation block 4
]


def _layer(bits, cols, rows, group, params, seed=0):
    torch.manual_seed(seed + cols + rows)
    linear = torch.nn.Linear(cols, rows, bias=False)
    if bits == 4:
        return Int4Linear.from_linear(linear, group, "vnni", params=params)
    q = Int8Linear.from_linear(linear, "vnni", group_size=group)
    q.weight[0, :8] = -128  # the one code whose magnitude int8 cannot hold: |w| is read as unsigned
    return q


@needs_both
@pytest.mark.parametrize("bits, cols, rows, group, params, batch", CASES)
def test_avx2_build_returns_the_vnni_builds_bits(bits, cols, rows, group, params, batch):
    """Same integer sums, same float operations in the same order: identical outputs, not just close."""
    q = _layer(bits, cols, rows, group, params)
    q.pack()
    packed, params_t = q._vnni
    x = torch.randn(batch, cols) * 2
    x[:, 3] = 40.0  # an outlier channel
    x[-1, :32] = 0.0  # an all-zero activation block
    g = group or cols
    a = _gemv("mb_qgemv", x, packed, params_t, rows, g, bits)
    b = _gemv("mb_qgemv_avx2", x, packed, params_t, rows, g, bits)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


@needs_avx2
@pytest.mark.parametrize("bits, cols, rows, group, params, batch", CASES)
def test_avx2_layers_equal_the_dequantized_reference(monkeypatch, bits, cols, rows, group, params, batch):
    """On a CPU without AVX-512, `auto` packs for the AVX2 build and says so; its outputs are the
    dequantized weights times int8 activations per block (the reference on the same activations)."""
    from tests.kernels.test_kernels import _fake_quantized_activations

    monkeypatch.setenv(clib.ISA_ENV, "avx2")
    assert not kernels.available() and kernels.matmul_isa() == "avx2"
    q = _layer(bits, cols, rows, group, params, seed=1)
    q.kernel = "auto"
    x = torch.randn(batch, 2, cols)
    block = kernels.activation_block(group or cols, bits)
    expected = q.reference_forward(_fake_quantized_activations(x, block))
    q.pack()
    assert q.kernel_in_use == "avx2"
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)


def test_a_cpu_without_avx512_gets_the_avx2_build(monkeypatch):
    """CPU flags of an AVX2 machine (no AVX-512): the AVX-512 kernels say why not, the matmul runs the
    AVX2 build; without AVX2 either, no build and a one-line reason."""
    flags = {f for f in clib.cpu_flags() if not f.startswith("avx512")}
    if not {"avx2", "fma", "f16c"} <= flags:
        pytest.skip("this CPU lacks AVX2")
    monkeypatch.setattr(clib, "cpu_flags", lambda: flags)
    assert "lacks avx512f" in kernels.unavailable_reason()
    assert kernels.matmul_isa() == "avx2" and kernels.matmul_unavailable_reason() is None
    monkeypatch.setattr(clib, "cpu_flags", lambda: flags - {"avx2"})
    assert kernels.matmul_isa() is None
    assert kernels.matmul_unavailable_reason() == "this CPU lacks avx2"
    q = Int8Linear.from_linear(torch.nn.Linear(64, 16, bias=False), "vnni")
    with pytest.raises(MobiLlamaError, match="vnni kernel cannot run here: this CPU lacks avx2"):
        q.pack()


def test_a_bad_isa_setting_is_one_clear_line(monkeypatch):
    monkeypatch.setenv(clib.ISA_ENV, "sse")
    reason = kernels.unavailable_reason()
    assert reason == "MOBILLAMA_KERNEL_ISA must be avx512 or avx2, not 'sse'"
    assert kernels.matmul_isa() is None and kernels.matmul_unavailable_reason() == reason
    with pytest.raises(MobiLlamaError, match="MOBILLAMA_KERNEL_ISA must be"):
        Int4Linear.from_linear(torch.nn.Linear(64, 16, bias=False), 32, "vnni").pack()


@needs_avx2
def test_the_avx2_build_holds_no_avx512_instruction():
    """Compiled apart without AVX-512 flags: no zmm register, no mask register, no ymm16-31 (EVEX)."""
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    text = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(kernels.build.build_library())],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    functions = re.split(r"\n(?=[0-9a-f]+ <)", text)
    # everything a CPU without AVX-512 calls: the AVX2 kernels, the one-call step (either build's driver),
    # and the lean runtime's helpers
    names = r"mb_\w+_avx2|mb_decode_layers|mb_prefill_layers|mb_qmat_gemv|mb_argmax|mb_sample|mb_bf16_to_f32|run_layers"
    avx2 = {}  # function (or its OpenMP body) -> its disassembly
    for f in functions:
        m = re.match(rf"[0-9a-f]+ <(({names})(\._omp_fn\.\d+)?)>:", f)
        if m:
            avx2[m.group(1)] = f
    assert {"mb_qgemv_avx2", "mb_qgemv_avx2._omp_fn.0", "mb_attn_prefill_avx2", "mb_bf16_gemv_avx2",
            "mb_prefill_layers_avx2", "run_layers", "mb_argmax", "mb_sample"} <= set(avx2)  # fmt: skip
    body = "\n".join(avx2.values())
    assert "ymm" in body  # it is vectorised
    assert not re.search(r"zmm|%k[1-7]|ymm(1[6-9]|2[0-9]|3[01])", body)


CONFIG = dict(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
)  # fmt: skip
PROMPT = [1, 17, 42, 99, 5]


def _quantized_model(monkeypatch, realistic_model, isa: str):
    from mobillama.config import ModelConfig
    from mobillama.infer.quant import quantize_model

    monkeypatch.setenv(clib.ISA_ENV, isa)
    model = realistic_model(ModelConfig(**CONFIG), seed=4)
    return quantize_model(model, 4, 32, head_bits=8)


def _step_logits(decoder, prompts: list[list[int]], steps: int, one_call: bool) -> torch.Tensor:
    """Prefill left-padded prompts, then ``steps`` greedy decode steps; the logits of every step."""
    if not one_call:
        decoder.one_call_layers, decoder._layer_array, decoder.cache = None, None, None
    T = max(map(len, prompts))
    decoder.start([T - len(p) for p in prompts], T + steps)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    logits = [decoder.prefill(ids)]
    for slot in range(T, T + steps):
        assert (decoder._layer_array is not None) == one_call
        logits.append(decoder.decode(logits[-1].argmax(-1), slot))
    return torch.stack(logits)


@needs_avx2
@pytest.mark.parametrize("cache", [torch.bfloat16, torch.float32])
def test_the_avx2_decode_step_equals_the_python_loop(monkeypatch, realistic_model, cache):
    """Without AVX-512 a decode step still goes through all layers in one C call, on the AVX2 kernels (norm,
    silu * up, rotary + cache + attention): its logits match PyTorch's operators around the same matmuls,
    for a left-padded batch of two, over a bf16 and an fp32 cache."""
    from mobillama.infer.decoder import FastDecoder

    model = _quantized_model(monkeypatch, realistic_model, "avx2")
    decoder = FastDecoder(model, cache_dtype=cache)
    assert decoder.step_isa == "avx2" and decoder.cache_dtype == cache and not decoder.fused_attention
    prompts = [PROMPT, PROMPT[2:]]
    fast = _step_logits(decoder, prompts, 6, one_call=True)
    loop = _step_logits(FastDecoder(model, cache_dtype=cache), prompts, 6, one_call=False)
    torch.testing.assert_close(fast, loop, rtol=1e-4, atol=1e-4 * loop.abs().max().item())


@needs_avx2
def test_a_model_decodes_on_the_avx2_build_as_on_the_vnni_one(monkeypatch, realistic_model):
    """A whole int4 g32 model with an int8 tied head, greedy: the AVX2 run generates the AVX-512 run's
    tokens from close logits."""
    from mobillama.infer.generator import Generator
    from mobillama.infer.quant import kernels_in_use
    from mobillama.infer.sampling import SamplingParams

    def run(isa: str):
        model = _quantized_model(monkeypatch, realistic_model, isa)
        gen = Generator(model)
        tokens = gen.generate_ids([PROMPT], SamplingParams(max_new_tokens=12, stop_at_eos=False))[0].token_ids
        return (
            kernels_in_use(model),
            gen.decoder.step_isa,
            tokens,
            _step_logits(gen.decoder, [PROMPT], 4, True),
        )

    used, step, tokens, logits = run("avx2")
    assert (used, step, len(tokens)) == ("avx2", "avx2", 12)
    if not kernels.available():
        return
    used_default, step_default, tokens_default, logits_default = run("avx512")
    assert (used_default, step_default) == ("vnni", "vnni")
    assert tokens == tokens_default
    torch.testing.assert_close(
        logits, logits_default, rtol=1e-3, atol=2e-3 * logits_default.abs().max().item()
    )


@needs_avx2
@pytest.mark.parametrize("cache", [torch.bfloat16, torch.float32])
def test_an_avx2_prompt_in_one_call_equals_its_tokens_one_at_a_time(monkeypatch, realistic_model, cache):
    """Without AVX-512 a prompt also goes through all layers in one C call (mb_prefill_layers_avx2): each
    projection reads its weights once for every token, each token attends over the slots before it; the
    last logits equal feeding the prompt one token at a time bit for bit, and PyTorch's loop to rounding."""
    from mobillama.infer.decoder import FastDecoder

    model = _quantized_model(monkeypatch, realistic_model, "avx2")
    decoder = FastDecoder(model, cache_dtype=cache)
    assert decoder.step_isa == "avx2"
    decoder.start([0], len(PROMPT) + 2)
    at_once = decoder.prefill(torch.tensor([PROMPT]))
    decoder.start([0], len(PROMPT) + 2)
    one_by_one = decoder.prefill(torch.tensor([PROMPT[:1]]))
    for slot, token in enumerate(PROMPT[1:], start=1):
        one_by_one = decoder.decode(torch.tensor([token]), slot)
    assert torch.equal(at_once, one_by_one)
    loop = _step_logits(FastDecoder(model, cache_dtype=cache), [PROMPT], 0, one_call=False)[0]
    torch.testing.assert_close(at_once, loop, rtol=1e-4, atol=1e-4 * loop.abs().max().item())


@needs_avx2
@pytest.mark.parametrize("rows, cols, batch", [(300, 576, 1), (40, 100, 3)])  # 100: a tail of 4 columns
def test_the_avx2_bf16_head_is_the_fp32_product_of_the_stored_weights(rows, cols, batch):
    torch.manual_seed(rows)
    w = torch.randn(rows, cols).to(torch.bfloat16)
    x = torch.randn(batch, cols)
    expected = x.double() @ w.double().T
    got = kernels.bf16_linear(x, w, "avx2")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    if kernels.available():
        torch.testing.assert_close(got, kernels.bf16_linear(x, w, "vnni"), rtol=1e-5, atol=1e-5)


@needs_avx2
def test_a_float_tied_head_runs_on_the_avx2_kernel(monkeypatch, realistic_model):
    """A bf16 table tied as the LM head of an int4 model (the default quantization) is read by the AVX2
    kernel without AVX-512 (fp32 activations, not rounded to bf16 as PyTorch's product rounds them): logits
    within that rounding, the same greedy token."""
    from mobillama.config import ModelConfig
    from mobillama.infer.decoder import FastDecoder
    from mobillama.infer.quant import quantize_model

    monkeypatch.setenv(clib.ISA_ENV, "avx2")
    model = quantize_model(realistic_model(ModelConfig(**CONFIG), seed=4).to(torch.bfloat16), 4, 32)
    fast = FastDecoder(model)
    assert fast.bf16_head_kernel == "avx2" and fast.head_dtype == torch.bfloat16
    plain = FastDecoder(model)
    plain.bf16_head_kernel = None
    for d in (fast, plain):
        d.start([0], len(PROMPT) + 1)
    a, b = (d.prefill(torch.tensor([PROMPT])) for d in (fast, plain))
    assert ((a - b).norm() / b.norm()).item() < 0.01
    assert torch.equal(a.argmax(-1), b.argmax(-1))
