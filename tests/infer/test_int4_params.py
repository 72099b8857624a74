"""How int4 scales and offsets are held (`--int4-params`): 8-bit codes in super-blocks ("codes", the
default where the weights are not already on a half-float grid) or half floats ("half"), chosen at
quantization time, recorded, and run by both runtimes with the same numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mobillama import kernels
from mobillama.cli import main
from mobillama.errors import MobiLlamaError
from mobillama.infer.decoder import FastDecoder
from mobillama.infer.quant import Int4Linear, quantize_model
from mobillama.infer.quant_checkpoint import load_quantized, quantize_checkpoint
from mobillama.infer.quant_layers import QuantizedLinear

VNNI = pytest.mark.skipif(not kernels.available(), reason=f"no CPU kernels: {kernels.unavailable_reason()}")
PROMPT = [5, 17, 42, 99, 3, 250, 7, 64]


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory, tokenizer_dir):
    """A micro model 128 wide (4 groups of 32 in every projection, so all of them can take codes), tied."""
    from fixtures import save_micro_checkpoint

    return save_micro_checkpoint(
        tmp_path_factory.mktemp("wide") / "ckpt",
        tokenizer_dir,
        embed_scale=20,
        hidden_size=128,
        intermediate_size=256,
        tie_word_embeddings=True,
    )


def _on_half_grid(rows: int, cols: int) -> torch.nn.Linear:
    """A Linear whose weights are q * s + m with 4-bit q and half-float s, m per group of 32 (a Q4_1 import)."""
    torch.manual_seed(1)
    s = (torch.rand(rows, cols // 32, 1) * 0.01 + 1e-3).half().float()
    m = (-8 * s + torch.randn(rows, cols // 32, 1) * 1e-3).half().float()
    q = torch.randint(0, 16, (rows, cols // 32, 32)).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans the whole grid, as a Q4_1 block's min and max do
    linear = torch.nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        linear.weight.copy_((q * s + m).reshape(rows, cols))
    return linear


def test_auto_keeps_weights_already_on_a_half_grid_exactly():
    linear = _on_half_grid(32, 256)
    w = linear.weight.detach()
    auto = Int4Linear.from_linear(linear, 32, "reference")
    assert auto.params_layout == "half"
    assert (auto.dequantize() - w).abs().max() <= 1e-6 * w.abs().max()
    codes = Int4Linear.from_linear(linear, 32, "reference", params="codes")
    assert codes.params_layout == "codes"
    assert (codes.dequantize() - w).abs().max() > 1e-4 * w.abs().max()  # re-coded: close, not exact
    assert (codes.dequantize() - w).norm() / w.norm() < 0.05


def test_auto_takes_codes_for_other_weights_and_groups_past_64_stay_half():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 32, bias=False)
    assert Int4Linear.from_linear(linear, 32).params_layout == "codes"
    assert Int4Linear.from_linear(linear, 64).params_layout == "codes"
    assert Int4Linear.from_linear(linear, 128).params_layout == "half"  # 2 groups a super-block: no gain
    assert Int4Linear.from_linear(torch.nn.Linear(64, 16), 32).params_layout == "half"  # 2 groups a row
    with pytest.raises(MobiLlamaError, match="int4 params must be one of"):
        Int4Linear.from_linear(linear, 32, params="fp8")


@VNNI
@pytest.mark.parametrize(
    "mode, dtype", [("codes", torch.uint8), ("half", torch.float16), ("auto", torch.uint8)]
)
def test_the_choice_is_recorded_and_decides_the_kernel_params(wide_checkpoint, tmp_path, mode, dtype):
    out = tmp_path / mode
    summary = quantize_checkpoint(wide_checkpoint, out, 4, quantize_head=True, int4_params=mode)
    info = json.loads((out / "quantization.json").read_text())
    assert info["int4_params"] == mode
    layers = info["int4_params_layers"]
    assert layers["codes" if dtype == torch.uint8 else "half"] > 0
    assert layers["half" if dtype == torch.uint8 else "codes"] == 0
    assert summary["int4_params_layers"] == info["int4_params_layers"]
    model = load_quantized(out, dtype=torch.bfloat16)
    params = {m._vnni[1].dtype for m in model.modules() if isinstance(m, QuantizedLinear)}
    assert params == {dtype}


@VNNI
def test_codes_decode_like_the_reference_and_the_lean_runtime_exactly(wide_checkpoint, tmp_path, monkeypatch):
    """All projections and the tied head on codes: the fast decoder tracks the dequantized reference,
    and the lean runtime equals the default runtime bit for bit (prompt in one call and token by token)."""
    from mobillama.infer import lean
    from mobillama.infer.load import serve_embedding_from_file

    monkeypatch.setenv("MOBILLAMA_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "q"
    quantize_checkpoint(wide_checkpoint, ckpt, 4, quantize_head=True, int4_params="codes")
    model = load_quantized(ckpt, dtype=torch.bfloat16)
    serve_embedding_from_file(model, str(ckpt))
    dec = FastDecoder(model)
    dec.start([0], len(PROMPT) + 4)
    theirs = dec.prefill(torch.tensor([PROMPT]))[0]
    reference = load_quantized(ckpt, dtype=torch.float32, int4_kernel="reference")
    expected = reference(torch.tensor([PROMPT]))[0, -1]
    assert (theirs - expected).abs().max() < 0.02 * expected.abs().max()  # int8 activations, bf16 cache
    image = lean.LeanModel.open(ckpt, quiet=True)
    assert {spec["qkv"]["per"] for spec in image.meta["layers"]} == {4} and image.head["per"] == 4
    image.start(len(PROMPT) + 4)
    np.testing.assert_array_equal(image.prefill(PROMPT), theirs.numpy())


def test_int4_params_on_the_command_line(wide_checkpoint, tmp_path, capsys):
    def quantize(bits: str, params: str, out: str) -> int:
        args = ["quantize", str(wide_checkpoint), "--bits", bits, "--int4-params", params]
        return main([*args, "--out", str(tmp_path / out)])

    assert quantize("4", "half", "h") == 0
    assert "int4 scales as half floats" in capsys.readouterr().out
    assert quantize("8", "codes", "x") == 2
    assert "--int4-params applies to --bits 4" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as e:
        quantize("4", "fp8", "y")
    assert e.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
    with pytest.raises(MobiLlamaError, match="int4 params must be one of"):
        quantize_model(torch.nn.Sequential(), 4, 32, int4_params=None)  # type: ignore[arg-type]
