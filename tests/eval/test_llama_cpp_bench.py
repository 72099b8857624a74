"""llama.cpp's ``llama-bench`` wrapper: its JSON parsed (a recorded sample, always) and a real run on a tiny
exported GGUF (where the tools are built). No wall-clock figure is asserted: only that the figures exist."""

from __future__ import annotations

import json
import sys

import pytest

from mobillama.errors import MobiLlamaError
from mobillama.eval import llama_cpp


def _test(n_prompt: int, n_gen: int, avg: float) -> dict:
    # the fields llama-bench 0.3.36 (build 0c1e570) prints per test, trimmed to those read plus a few others
    return {
        "build_commit": "0c1e570",
        "cpu_info": "AMD EPYC",
        "model_type": "llama ?B Q8_0",
        "model_size": 275200,
        "model_n_params": 217664,
        "n_batch": 2048,
        "n_threads": 1,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "n_depth": 0,
        "avg_ns": 1168323,
        "stddev_ns": 0,
        "avg_ts": avg,
        "stddev_ts": 0.0,
        "samples_ns": [1168323],
        "samples_ts": [avg],
    }


RECORDED = json.dumps([_test(16, 0, 13694.842950), _test(0, 8, 7854.518606)], indent=2)


def test_parse_recorded_llama_bench_json():
    r = llama_cpp.parse_bench_json(RECORDED)
    assert r["prefill_tok_s"] == pytest.approx(13694.842950)
    assert r["decode_tok_s"] == pytest.approx(7854.518606)
    assert r["n_prompt"] == 16 and r["n_gen"] == 8
    assert r["model_type"] == "llama ?B Q8_0" and r["model_size"] == 275200 and r["n_threads"] == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("| model | size |", "no JSON"),
        ("{}", "not a list"),
        ("[]", "not a list"),
        ('[{"n_prompt": 16}]', "lacks"),
    ],
)
def test_parse_rejects_what_is_not_llama_bench_json(text, message):
    with pytest.raises(MobiLlamaError, match=message):
        llama_cpp.parse_bench_json(text)


def test_run_measured_reads_this_childs_peak_rss_and_reports_failures():
    # a child that touches ~64 MB: its own peak is reported, not this process's or an earlier child's
    out, _, peak = llama_cpp.run_measured([sys.executable, "-c", "b = bytearray(64 << 20); print('ok')"])
    assert out.strip() == "ok" and peak > 64 << 20
    _, _, small = llama_cpp.run_measured([sys.executable, "-c", "pass"])
    assert small < peak
    with pytest.raises(MobiLlamaError, match=r"failed \(exit 3\): boom"):
        llama_cpp.run_measured(
            [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]
        )
    with pytest.raises(MobiLlamaError, match="killed after"):
        llama_cpp.run_measured([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)


@pytest.mark.parametrize("kwargs", [{"threads": 0}, {"n_gen": 0}, {"repetitions": 1.5}])
def test_bench_rejects_bad_arguments(kwargs):
    with pytest.raises(MobiLlamaError, match="must be an integer"):
        llama_cpp.bench("unused.gguf", **kwargs)


def test_bench_runs_on_a_tiny_exported_gguf(tmp_path, llama_cpp_tools):
    from mobillama.checkpoint import save_checkpoint
    from mobillama.convert import export_gguf
    from mobillama.infer.load import load_for_inference

    model = load_for_inference("micro", dtype="fp32", seed=0)
    save_checkpoint(model.state_dict(), model.config, tmp_path / "micro")
    export_gguf(tmp_path / "micro", tmp_path / "micro.gguf", gguf_type="q8_0")
    r = llama_cpp.bench(tmp_path / "micro.gguf", threads=1, n_prompt=8, n_gen=4, repetitions=1)
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
    assert r["n_prompt"] == 8 and r["n_gen"] == 4 and r["n_threads"] == 1
    assert r["peak_rss_bytes"] > (tmp_path / "micro.gguf").stat().st_size
    with pytest.raises(MobiLlamaError, match="failed to load model"):
        llama_cpp.bench(tmp_path / "missing.gguf", threads=1, n_prompt=8, n_gen=4)
