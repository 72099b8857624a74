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
