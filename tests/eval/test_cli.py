"""The eval commands' argument handling and error messages."""

from __future__ import annotations

import json

import pytest

from mobillama.cli import main


@pytest.mark.parametrize("argv", [["eval"], ["eval", "run"], ["eval", "fetch-data"], ["eval", "compare"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    assert "usage: mobillama eval" in capsys.readouterr().out


def test_every_option_has_help(capsys):
    for sub in ("run", "fetch-data", "compare"):
        with pytest.raises(SystemExit):
            main(["eval", sub, "--help"])
    out = capsys.readouterr().out
    for option in ("--suite", "--tasks", "--perplexity", "--limit", "--batch-size", "--out", "--data-dir",
                   "--seed", "--truthfulqa", "--downloads", "--iters"):  # fmt: skip
        assert option in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "CKPT", "--suite", "nope"], "unknown suite 'nope'"),
        (["eval", "CKPT", "--tasks", "piqa,bogus"], "unknown task 'bogus'"),
        (["eval", "CKPT", "--limit", "0"], "--limit must be a positive integer"),
        (["eval", "CKPT", "--batch-size", "0"], "--batch-size must be a positive integer"),
        (["eval", "CKPT", "--data-dir", "DATA/none"], "eval data directory"),
        (["eval", "compare", "DATA/a.json", "DATA/b.json"], "report not found"),
        (["eval", "fetch-data", "--out", "DATA/out", "--downloads", "DATA"], "no downloaded file"),
    ],
)
def test_errors_are_one_line(argv, message, tmp_path, checkpoint, capsys):
    argv = [a.replace("CKPT", str(checkpoint)).replace("DATA", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_missing_checkpoint(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert main(["eval", str(tmp_path / "nope"), "--data-dir", str(tmp_path / "data")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_compare_command(tmp_path, capsys):
    def report(scores):
        task = {"column": "PIQA", "status": "ok", "value": sum(scores) / len(scores), "ci95": [0, 1],
                "metric": "acc", "num_fewshot": 0, "n": len(scores),
                "samples": {"ids": [str(i) for i in range(len(scores))], "scores": scores}}  # fmt: skip
        return {"format": "mobillama-eval-report/1", "tasks": {"piqa": task}, "settings": {}, "average": {}}

    (tmp_path / "a.json").write_text(json.dumps(report([0.0] * 40 + [1.0] * 60)))
    (tmp_path / "b.json").write_text(json.dumps(report([1.0] * 100)))
    assert (
        main(["eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--iters", "500"]) == 0
    )
    out = capsys.readouterr().out
    assert "| piqa | 100 | 60.00 | 100.00 | +40.00 |" in out
    assert main(["eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tasks"]["piqa"]["p_value"] == 0.0 and res["average"]["diff"] == pytest.approx(0.4)
