"""The bench library on a micro model: every figure present and sane; the duplicated-FFN control."""

from __future__ import annotations

import pytest
import torch

from mobillama.errors import MobiLlamaError
from mobillama.infer.bench import bytes_per_decode_token, duplicate_ffn, format_bench, run_bench


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_run_bench_reports_every_figure(bits):
    r = run_bench(
        "tiny",
        bits=bits,
        group_size=32 if bits == 4 else None,
        prompt_len=8,
        new_tokens=4,
        threads=1,
        measure_bandwidth=False,
    )
    for key in (
        "prefill_tok_s",
        "decode_tok_s",
        "ttft_s",
        "model_bytes",
        "peak_rss_bytes",
        "bytes_per_token",
    ):
        assert r[key] > 0, key
    assert r["bits"] == bits
    assert r["unique_bytes_per_token"] < r["bytes_per_token"]  # the shared FFN read by 4 layers
    assert "decode" in format_bench(r)


def test_roofline_figures_are_consistent():
    r = run_bench("micro", prompt_len=4, new_tokens=3, threads=1)
    assert r["roofline_gb_s"] > 0
    assert r["fraction_of_roofline"] == pytest.approx(r["achieved_gb_s"] / r["roofline_gb_s"])
    # micro shares one FFN among its layers: the unique bytes (FFN once) are fewer than the re-read ones,
    # and so is the bandwidth they imply at the same tok/s
    assert r["unique_bytes_per_token"] < r["bytes_per_token"]
    for key, nbytes in (
        ("achieved_gb_s", "bytes_per_token"),
        ("achieved_unique_gb_s", "unique_bytes_per_token"),
    ):
        assert r[key] == pytest.approx(r[nbytes] * r["decode_tok_s"] / 1e9)
    assert r["unique_fraction_of_roofline"] < r["fraction_of_roofline"]
    text = format_bench(r)
    assert "GB/s on unique bytes" in text and "GB unique (FFN once)" in text


def test_unique_bytes_count_the_shared_ffn_once(byte_model):
    """Re-read minus unique bytes is exactly the FFN read again by every layer but the first."""
    from mobillama.infer.quant import weight_bytes

    shared = byte_model()
    per_token, unique = bytes_per_decode_token(shared, 16)
    ffn = weight_bytes(shared.model.ffns[0])
    assert per_token - unique == ffn * (shared.config.num_hidden_layers - 1) > 0
    unshared = byte_model(ffn_sharing="none")
    assert len(unshared.model.ffns) == unshared.config.num_hidden_layers
    per_token, unique = bytes_per_decode_token(unshared, 16)
    assert per_token == unique


def test_byte_counts_of_a_quantized_tied_head(tied_checkpoints):
    """A quantized tied head is counted at its quantized size and the lookup at one quantized row."""
    from mobillama.checkpoint import load_model
    from mobillama.infer.load import load_for_inference
    from mobillama.infer.quant import embedding_row_bytes, quantize_model

    kept = quantize_model(load_model(tied_checkpoints["all"], dtype=torch.float32), 8, quantize_head=True)
    c = kept.config
    assert embedding_row_bytes(kept) == c.hidden_size + 4  # int8 row + its fp32 scale
    float_head = load_for_inference(tied_checkpoints["all"], dtype="fp32")
    assert embedding_row_bytes(float_head) == c.hidden_size * 4
    q = bytes_per_decode_token(kept, 16)[0]
    f = bytes_per_decode_token(float_head, 16)[0]
    assert q < f / 3  # int8 weights: a quarter of fp32, plus scales


def test_duplicated_ffn_gives_the_same_logits_and_more_bytes(byte_model):
    model = byte_model()
    ids = torch.randint(3, 259, (1, 12))
    with torch.inference_mode():
        before = model(ids)
        shared_bytes = bytes_per_decode_token(model, 16)
        duplicate_ffn(model)
        after = model(ids)
    assert len(model.model.ffns) == model.config.num_hidden_layers
    assert torch.equal(before, after)
    per_token, unique = bytes_per_decode_token(model, 16)
    assert per_token == shared_bytes[0] and unique == per_token > shared_bytes[1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt_len": 0}, "prompt_len"),
        ({"new_tokens": 1}, "new_tokens"),
        ({"threads": 0}, "threads"),
        ({"prompt_len": 250, "new_tokens": 10}, "exceeds the context"),
        ({"dtype": "fp16"}, "dtype"),
    ],
)
def test_bad_bench_arguments(kwargs, message):
    with pytest.raises(MobiLlamaError, match=message):
        run_bench("micro", measure_bandwidth=False, **kwargs)
