"""The study machinery end to end on a micro scale: runs, resumption, aggregation, report, CLI errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import yaml

from mobillama.cli import main
from mobillama.errors import MobiLlamaError
from mobillama.study.runner import load_study, run_study, study_arms

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
    root.mkdir()
    manifest = {
        "seq_len": 16,
        "sample_len": 17,
        "dtype": "uint16",
        "vocab_size": 128,
        "tokenizer_sha256": "t",
        "bos_id": 1,
        "eos_id": 2,
        "splits": {},
    }
    for split, n in (("train", 64), ("val", 8)):
        rows = 3 + (rng.integers(0, 100, (n, 1)) + np.arange(17)) % 100
        path = root / f"{split}-00000.bin"
        rows.astype("uint16").tofile(path)
        manifest["splits"][split] = {
            "shards": [
                {"path": path.name, "num_samples": n, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            ],
            "num_samples": n,
            "num_tokens": n * 17,
            "num_bytes": n * 40,
        }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


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
    report = (out / "report.md").read_text()
    assert "| shared |" in report and "paired" in report
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
