"""int8 with one scale per group of input columns (``--int8-group-size``; 32 is llama.cpp's Q8_0 grid):
quantization, the kernels, checkpoints, the tied embedding that shares the head's matrix, both runtimes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mobillama import kernels
from mobillama.cli import main
from mobillama.errors import MobiLlamaError
from mobillama.infer.decoder import FastDecoder
from mobillama.infer.load import load_for_inference, serve_embedding_from_file
from mobillama.infer.quant import Int8Linear, QuantizedEmbedding, quantize_model
from mobillama.infer.quant_checkpoint import load_quantized, quantize_checkpoint

VNNI = pytest.mark.skipif(not kernels.available(), reason=f"no CPU kernels: {kernels.unavailable_reason()}")
PROMPT = [5, 17, 42, 99, 3, 250, 7, 64]


def _activations_as_the_kernel_sees_them(x: torch.Tensor) -> torch.Tensor:
    blocks = x.unflatten(-1, (-1, 32))
    scale = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
    return ((blocks / scale).round().clamp(-127, 127) * scale).flatten(-2)


def test_a_scale_per_group_confines_an_outlier_weight_to_its_group():
    """One large weight sets the scale of its whole row per channel; per group of 32 only its group's."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 16, bias=False)
    with torch.no_grad():
        linear.weight[:, 7] = 3.0
    w = linear.weight.detach()
    per_row = Int8Linear.from_linear(linear, "reference")
    grouped = Int8Linear.from_linear(linear, "reference", group_size=32)
    assert per_row.scales.shape == (16,) and grouped.scales.shape == (16, 8)
    assert torch.equal(grouped.scales, grouped.scales.half().float())  # the kernel's half-float params
    error = [(m.dequantize() - w).norm() / w.norm() for m in (per_row, grouped)]
    assert error[1] * 2 < error[0]  # measured 2.9x
    with pytest.raises(MobiLlamaError, match="does not divide"):
        Int8Linear(100, 16, group_size=32)


@VNNI
@pytest.mark.parametrize("group", [32, 64, 256])
def test_the_vnni_kernel_equals_the_reference_per_group(group):
    torch.manual_seed(group)
    linear = torch.nn.Linear(256, 40, bias=False)
    q = Int8Linear.from_linear(linear, "vnni", group_size=group)
    x = torch.randn(3, 256)
    expected = q.reference_forward(_activations_as_the_kernel_sees_them(x))
    q.pack()
    assert q.kernel_in_use == "vnni" and q.vnni_matrix()[2] == group
    assert q._vnni[1].numel() == 3 * (256 // group) * 32  # 3 blocks of 16 rows, a line of params per group
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)


def test_without_the_vnni_kernel_a_grouped_layer_takes_the_reference_path():
    """PyTorch's int8 kernels (weight-only, fbgemm) take one scale per channel."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16, bias=False)
    q = Int8Linear.from_linear(linear, "weight_only", group_size=32)
    x = torch.randn(2, 64)
    q.pack()
    assert q.kernel_in_use == "reference"
    torch.testing.assert_close(q(x), x @ q.dequantize().T)


@pytest.mark.parametrize("bits, head_bits", [(8, None), (4, 8)])
def test_checkpoints_record_it_and_the_tied_embedding_shares_the_grouped_matrix(
    tied_checkpoints, tmp_path, bits, head_bits
):
    out = tmp_path / "q"
    summary = quantize_checkpoint(
        tied_checkpoints["all"], out, bits, quantize_head=True, head_bits=head_bits, int8_group_size=32
    )
    assert summary["int8_group_size"] == 32
    assert json.loads((out / "quantization.json").read_text())["int8_group_size"] == 32
    model = load_quantized(out, int8_kernel="reference", int4_kernel="reference", pack=False)
    head, embed = model.lm_head, model.model.embed_tokens
    assert (
        isinstance(head, Int8Linear) and head.group_size == 32 and head.scales.shape == (head.out_features, 2)
    )
    assert isinstance(embed, QuantizedEmbedding) and embed.scales is head.scales
    ids = torch.tensor([[3, 99, 250]])
    torch.testing.assert_close(embed(ids).float(), head.dequantize()[ids].to(embed.dtype).float())
    assert embed.row_bytes == 64 + 2 * 4
    per_row = quantize_checkpoint(
        tied_checkpoints["all"], tmp_path / "r", bits, quantize_head=True, head_bits=head_bits
    )
    assert summary["bytes_after"] > per_row["bytes_after"]  # one more scale per group


@VNNI
def test_both_runtimes_give_the_same_numbers_on_grouped_int8(tied_checkpoints, tmp_path, monkeypatch):
    from mobillama.infer import lean

    monkeypatch.setenv("MOBILLAMA_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "q"
    quantize_checkpoint(tied_checkpoints["none"], ckpt, 8, quantize_head=True, int8_group_size=32)
    model = load_quantized(ckpt, dtype=torch.bfloat16)
    serve_embedding_from_file(model, str(ckpt))
    dec = FastDecoder(model)
    dec.start([0], len(PROMPT) + 4)
    theirs = dec.prefill(torch.tensor([PROMPT]))[0]
    reference = load_for_inference(ckpt, dtype="fp32", int8_kernel="reference")(torch.tensor([PROMPT]))[0, -1]
    assert (theirs - reference).abs().max() < 0.02 * reference.abs().max()
    image = lean.LeanModel.open(ckpt, quiet=True)
    image.start(len(PROMPT) + 4)
    np.testing.assert_array_equal(image.prefill(PROMPT), theirs.numpy())


def test_bad_int8_group_sizes_are_one_line_errors(tied_checkpoints, byte_model, tmp_path, capsys):
    with pytest.raises(MobiLlamaError, match="int8 group size must be one of"):
        quantize_model(byte_model(), 8, int8_group_size=48)
    with pytest.raises(MobiLlamaError, match="needs int8 layers"):
        quantize_model(byte_model(), 4, 32, int8_group_size=32)
    with pytest.raises(MobiLlamaError, match="does not divide"):
        quantize_model(byte_model(), 8, int8_group_size=256)  # micro's hidden size is 64
    # a checkpoint job checks its arguments before it reads the model
    for kwargs, message in (
        ({"int8_group_size": 48}, "int8 group size"),
        ({"int4_params": "x"}, "int4 params"),
    ):
        with pytest.raises(MobiLlamaError, match=message):
            quantize_checkpoint(tmp_path / "not-read", tmp_path / "o", 8, **kwargs)
    args = ["quantize", str(tied_checkpoints["all"]), "--bits", "4", "--int8-group-size", "32"]
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    assert "needs int8 layers" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(
            ["quantize", str(tied_checkpoints["all"]), "--bits", "8", "--int8-group-size", "x", "--out", "y"]
        )
    ok = ["quantize", str(tied_checkpoints["all"]), "--bits", "8", "--int8-group-size", "32"]
    assert main([*ok, "--out", str(tmp_path / "ok")]) == 0
    assert "int8 scales per 32 columns" in capsys.readouterr().out
    info = tmp_path / "ok" / "quantization.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "int8_group_size": 33}))
    with pytest.raises(MobiLlamaError, match="quantization.json: int8 group size must be one of"):
        load_quantized(tmp_path / "ok")
