"""The study machinery end to end on a micro scale: runs, resumption, aggregation, report, CLI errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from fixtures import write_token_shards
from mobillama.cli import main
from mobillama.errors import MobiLlamaError
from mobillama.study.runner import (
    StudyConfig,
    aggregate_benchmarks,
    load_study,
    measure_training_memory,
    quick_benchmark_items,
    run_study,
    study_arms,
)

REAL_EVAL_DATA = Path(os.environ.get("MOBILLAMA_EVAL_DATA", "~/.cache/mobillama/eval-data")).expanduser()

MODEL = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}


def write_data(root):
    """A shard directory with a learnable pattern (next token = previous + 1)."""
    rng = np.random.default_rng(0)
    rows = {
        split: [3 + (rng.integers(0, 100, (n, 1)) + np.arange(17)) % 100]
        for split, n in (("train", 64), ("val", 8))
    }
    fields = {"train": {"num_bytes": 64 * 40}, "val": {"num_bytes": 8 * 40}}
    return write_token_shards(root, rows, vocab_size=128, split_fields=fields)


@pytest.fixture
def study_file(tmp_path):
    data = write_data(tmp_path / "data")
    config = {
        "name": "t",
        "data": str(data),
        "model": MODEL,
        "tokens_per_run": 256,
        "seeds": [0, 1],
        "out_dir": str(tmp_path / "study"),
        "arms": ["shared", "baseline2-shallow", "shared-from-large-base"],
        "recipe_overrides": [
            "batch.global_batch_tokens=64",
            "batch.micro_batch_size=4",
            "optim.warmup_steps=1",
            "eval.every_steps=2",
            "checkpoint.every_steps=4",
            "log.tensorboard=false",
            "log.progress=false",
            "data.verify_hashes=false",
        ],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_study_runs_aggregates_and_resumes(study_file, capsys):
    study = load_study(study_file)
    names = [a.name for a in study_arms(study)]
    assert "large-base" in names  # pulled in as the source of the init arm
    results = run_study(study, say=lambda *a: None)
    out = study.out
    for arm in names:
        for seed in (0, 1):
            assert (out / arm / f"seed-{seed}" / "checkpoints.json").is_file()
    shared = results["arms"]["shared"]
    losses = [r["val_loss"] for r in shared["runs"]]
    assert shared["val_loss"]["mean"] == pytest.approx(sum(losses) / 2)
    assert shared["val_loss"]["low"] <= shared["val_loss"]["mean"] <= shared["val_loss"]["high"]
    assert set(results["comparisons"]) == {f"shared - {n}" for n in names if n != "shared"}
    # checkpoints of this micro study have no tokenizer: the benchmarks say so instead of failing
    assert shared["bench"]["status"] == "not available"
    assert shared["memory"]["peak_rss_mb"] > 0
    report = (out / "report.md").read_text()
    assert "| shared |" in report and "paired" in report and "Quick benchmarks not run" in report
    assert (out / "shared" / "seed-0" / "study-eval.json").is_file()  # evaluations are cached per run
    assert (out / "loss_vs_tokens.png").stat().st_size > 0 and (
        out / "loss_vs_parameters.png"
    ).stat().st_size > 0
    # the init arm really started from the trained large base, collapsed by the mean strategy
    assert (out / "shared-from-large-base" / "seed-0-init" / "model.safetensors").is_file()
    # a second invocation trains nothing and gives the same numbers
    before = {p: p.stat().st_mtime for p in out.rglob("model.safetensors")}
    again = run_study(load_study(study_file), say=lambda *a: None)
    assert again["arms"]["shared"]["val_loss"] == results["arms"]["shared"]["val_loss"]
    assert before == {p: p.stat().st_mtime for p in out.rglob("model.safetensors")}


def test_bad_study_configs(tmp_path, study_file):
    with pytest.raises(MobiLlamaError, match="not found"):
        load_study(tmp_path / "nope.yaml")
    cfg = yaml.safe_load(study_file.read_text())
    for change, message in [
        ({"tokens_per_run": -1}, "tokens_per_run"),
        ({"seedz": [1]}, "unknown study key 'seedz'"),
        ({"seeds": []}, "seeds"),
        ({"bench_limit": -3}, "bench_limit"),
        ({"bench_limit": "all"}, "bench_limit"),
        ({"arms": ["nope"]}, "unknown arm 'nope'"),
        ({"model": {**MODEL, "hidden": 3}}, "unknown config field 'hidden'"),
    ]:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**cfg, **change}))
        with pytest.raises(MobiLlamaError, match=message):
            study_arms(load_study(path))
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "model"}))
    with pytest.raises(MobiLlamaError, match="missing study key 'model'"):
        load_study(path)


def test_cli_lists_arms_with_matched_parameters(study_file, capsys):
    assert main(["study", "--config", str(study_file), "--list-arms", "--arms", "shared,baseline1-thin"]) == 0
    out = capsys.readouterr().out
    assert "shared" in out and "baseline1-thin" in out
    assert main(["study", "--config", str(study_file), "--seeds", "a,b"]) == 2


def _bench(scores: dict[str, list[float]]) -> dict:
    return {
        "status": "ok",
        "tasks": {t: {"ids": [str(i) for i in range(len(s))], "scores": s} for t, s in scores.items()},
    }


def test_benchmark_aggregation_averages_items_over_seeds():
    seeds = [
        _bench({"piqa": [1.0, 0.0, 1.0, 1.0], "arc": [0.0, 0.0]}),
        _bench({"piqa": [1.0, 1.0, 0.0, 1.0], "arc": [1.0, 0.0]}),
    ]
    agg = aggregate_benchmarks(seeds)
    assert agg["items"] == {"arc": [0.5, 0.0], "piqa": [1.0, 0.5, 0.5, 1.0]}
    assert agg["tasks"]["piqa"]["mean"] == pytest.approx(0.75)
    assert agg["tasks"]["arc"]["mean"] == pytest.approx(0.25)
    assert agg["average"]["mean"] == pytest.approx(0.5)  # tasks weigh equally, whatever their size
    assert agg["average"]["ci_low"] <= 0.5 <= agg["average"]["ci_high"]
    # one run without benchmarks makes the arm's benchmark result unavailable, with the reason
    missing = aggregate_benchmarks([seeds[0], {"status": "not available", "reason": "no data"}])
    assert missing == {"status": "not available", "reason": "no data"}
    # runs that scored different items cannot be paired
    other = _bench({"piqa": [1.0, 1.0, 0.0, 1.0], "arc": [1.0, 0.0]})
    other["tasks"]["arc"]["ids"] = ["7", "8"]
    with pytest.raises(MobiLlamaError, match="arc: the runs scored different items"):
        aggregate_benchmarks([seeds[0], other])


def test_training_memory_is_measured_per_model_in_a_fresh_process():
    from mobillama.config import ModelConfig

    small = ModelConfig.from_dict(MODEL)
    big = small.replace(vocab_size=8192, hidden_size=256, intermediate_size=704)  # ~4.6M more parameters
    m_small = measure_training_memory(small, micro_batch=2, seq_len=16)
    m_big = measure_training_memory(big, micro_batch=2, seq_len=16)
    assert (
        m_small["peak_rss_mb"] >= m_small["above_idle_mb"] >= 0
    )  # a tiny model may stay under the import peak
    # weights, grads and two AdamW moments: 16 bytes per parameter, ~70 MB more for the big model
    assert m_big["above_idle_mb"] - m_small["above_idle_mb"] > 50


def test_training_memory_falls_back_to_sampling_without_clear_refs():
    """Where /proc/self/clear_refs cannot be written, a sampling thread still sees training's memory.

    Run in a fresh interpreter, like the real measurement: in the test process, memory freed by
    earlier tests could be reused without the resident size growing.
    """
    import subprocess
    import sys

    child = f"""
import json
from pathlib import Path
from mobillama.study import runner

real_write = Path.write_text

def refuse_clear_refs(self, *args, **kwargs):
    if self.name == "clear_refs":
        raise PermissionError(13, "Permission denied", str(self))
    return real_write(self, *args, **kwargs)

Path.write_text = refuse_clear_refs
config = dict({MODEL!r}, vocab_size=8192, hidden_size=256, intermediate_size=704)
print(json.dumps(runner._training_memory_child(config, 2, 16)))
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout.splitlines()[-1])
    assert measured["peak_rss_mb"] > measured["above_idle_mb"] > 40  # ~4.6M params x 16 bytes


@pytest.mark.skipif(not (REAL_EVAL_DATA / "manifest.json").is_file(), reason="benchmark data not fetched")
def test_quick_benchmark_items_on_a_real_checkpoint(tmp_path):
    from mobillama.serve.demo import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    study = StudyConfig(name="b", data="unused", model=MODEL, tokens_per_run=1, bench_limit=3,
                        bench_data=str(REAL_EVAL_DATA))  # fmt: skip
    items = quick_benchmark_items(study, ckpt)
    assert items["status"] == "ok" and set(items["tasks"]) == {"piqa", "arc_challenge", "winogrande"}
    assert all(len(t["scores"]) == 3 and set(t["scores"]) <= {0.0, 1.0} for t in items["tasks"].values())
    agg = aggregate_benchmarks([items, items])
    assert agg["tasks"]["piqa"]["mean"] == pytest.approx(sum(items["tasks"]["piqa"]["scores"]) / 3)
    # no data directory or no tokenizer: a reason, not a crash
    study.bench_data = str(tmp_path / "nowhere")
    assert quick_benchmark_items(study, ckpt)["status"] == "not available"
    study.bench_limit = 0
    assert quick_benchmark_items(study, ckpt)["status"] == "skipped"
