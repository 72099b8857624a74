"""Suites, offline task rendering, data validation and the report, on small synthetic data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mobillama.cli import main
from mobillama.errors import MobiLlamaError
from mobillama.eval import report as report_module
from mobillama.eval import suites
from mobillama.eval.report import compare_reports, format_markdown, load_report, write_report

PIQA_ROWS = [
    {"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
    {"goal": "How do I dry a shirt?", "sol1": "Soak it.", "sol2": "Hang it in the sun.", "label": 1},
    {"goal": "How to boil an egg?", "sol1": "Put it in boiling water.", "sol2": "Freeze it.", "label": 0},
    {"goal": "How to sharpen a pencil?", "sol1": "Use a sharpener.", "sol2": "Use a spoon.", "label": 0},
    {"goal": "How to cool tea?", "sol1": "Wait.", "sol2": "Heat it.", "label": 0},
]


def write_rows(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def data_dir(tmp_path) -> Path:
    write_rows(tmp_path / "data" / "piqa" / "validation.jsonl", PIQA_ROWS)
    return tmp_path / "data"


def test_suites_have_the_paper_settings():
    paper = {s.name: s for s in suites.get_suite("paper")}
    assert list(paper) == ["hellaswag", "truthfulqa_mc2", "mmlu", "arc_challenge", "crows_pairs", "piqa",
                           "race", "siqa", "winogrande"]  # fmt: skip
    assert (paper["hellaswag"].num_fewshot, paper["hellaswag"].metric) == (10, "acc_norm")
    assert (paper["arc_challenge"].num_fewshot, paper["arc_challenge"].metric) == (25, "acc_norm")
    assert paper["mmlu"].num_fewshot == 5 and paper["winogrande"].num_fewshot == 5
    assert paper["truthfulqa_mc2"].num_fewshot == 0
    assert all(s.num_fewshot == 0 for s in suites.get_suite("quick"))


def test_unknown_suite_and_task():
    with pytest.raises(MobiLlamaError, match="unknown suite 'nope'; choose one of: paper, quick"):
        suites.get_suite("nope")
    with pytest.raises(MobiLlamaError, match="unknown task 'hellaswagg'"):
        suites.get_tasks(["piqa", "hellaswagg"])


def test_missing_data_dir(tmp_path, checkpoint):
    with pytest.raises(MobiLlamaError, match="not found; populate it with 'mobillama eval fetch-data"):
        suites.run_suite(checkpoint, suites.get_tasks(["piqa"]), data_dir=tmp_path / "absent")


def test_status_of_absent_and_unavailable_tasks(data_dir):
    assert suites.task_status(suites.TASKS["piqa"], data_dir) == ("ok", "")
    status, reason = suites.task_status(suites.TASKS["race"], data_dir)
    assert status == "not available offline" and "hub" in reason
    status, reason = suites.task_status(suites.TASKS["truthfulqa_mc2"], data_dir)
    assert status == "missing data" and "--truthfulqa" in reason
    assert suites.task_status(suites.TASKS["mmlu"], data_dir)[0] == "missing data"


@pytest.mark.parametrize(
    "bad_row,match",
    [
        ("{not json", "row 3: not valid JSON"),
        ("[1, 2]", "row 3: expected a JSON object, got list"),
        (json.dumps({"goal": "x", "sol1": "a", "label": 0}), "row 3: missing field 'sol2'"),
        ("", "row 3: empty line"),
    ],
)
def test_malformed_rows_name_task_and_row(tmp_path, bad_row, match):
    write_rows(tmp_path / "piqa" / "validation.jsonl", [*PIQA_ROWS[:2], bad_row, PIQA_ROWS[3]])
    with pytest.raises(MobiLlamaError, match=f"task piqa: .*validation.jsonl {match}"):
        suites.validate_rows(suites.TASKS["piqa"], tmp_path)


def test_empty_data_file(tmp_path):
    write_rows(tmp_path / "piqa" / "validation.jsonl", [])
    (tmp_path / "piqa" / "validation.jsonl").write_text("")
    with pytest.raises(MobiLlamaError, match="task piqa: .* has no rows"):
        suites.validate_rows(suites.TASKS["piqa"], tmp_path)


def test_malformed_row_stops_run_before_model_loads(tmp_path, checkpoint):
    write_rows(tmp_path / "piqa" / "validation.jsonl", [PIQA_ROWS[0], '"just a string"'])
    code = main(["eval", str(checkpoint), "--tasks", "piqa", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "r.json")])  # fmt: skip
    assert code == 2 and not (tmp_path / "r.json").exists()


def test_offline_run_reports_every_task(checkpoint, data_dir, tmp_path):
    specs = suites.get_tasks(["piqa", "race", "truthfulqa_mc2"])
    report = suites.run_suite(checkpoint, specs, data_dir=data_dir, limit=4, batch_size=4, seed=3)
    piqa = report["tasks"]["piqa"]
    assert piqa["status"] == "ok" and piqa["n"] == 4 and len(piqa["samples"]["scores"]) == 4
    assert piqa["value"] == pytest.approx(piqa["lm_eval_value"])
    assert piqa["ci95"][0] <= piqa["value"] <= piqa["ci95"][1]
    assert piqa["stderr"] is not None
    assert piqa["chance"] == 0.5  # two solutions per PIQA goal, read off lm-eval's own requests
    assert report["tasks"]["race"]["status"] == "not available offline"
    assert report["tasks"]["truthfulqa_mc2"]["status"] == "missing data"
    assert report["average"] == {"value": piqa["value"], "tasks": 1, "of": 3}
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"

    out, md = write_report(report, tmp_path / "out" / "r.json")
    assert load_report(out)["tasks"]["piqa"]["n"] == 4
    table = md.read_text()
    assert "MobiLlama 0.5B (paper) | 52.52" in table and "| race | not available offline |" in table
    assert "--limit 4" in table
    cmp = compare_reports(out, out, iters=200)
    assert cmp["tasks"]["piqa"]["diff"] == 0 and cmp["skipped"] == ["race", "truthfulqa_mc2"]

    again = suites.run_suite(checkpoint, specs, data_dir=data_dir, limit=4, batch_size=1, seed=3)
    assert again["tasks"]["piqa"]["samples"] == piqa["samples"]


def test_markdown_marks_missing_columns():
    report = {
        "tasks": {
            "piqa": {
                "column": "PIQA",
                "status": "ok",
                "value": 0.5,
                "ci95": [0.4, 0.6],
                "metric": "acc",
                "num_fewshot": 0,
                "n": 10,
            }
        },  # fmt: skip
        "average": {"value": 0.5, "tasks": 1, "of": 1},
        "settings": {},
    }
    lines = format_markdown(report, "mine").splitlines()
    assert lines[7].startswith("| mine | n/a | n/a | n/a | n/a | n/a | 50.00 ±10.0 | n/a")


def test_markdown_averages_only_the_scored_columns_and_shows_chance():
    """A 2-task run must not put its 2-task average beside the paper's 9-task averages."""
    task = {"status": "ok", "ci95": [0.4, 0.6], "metric": "acc", "num_fewshot": 0, "n": 10}
    report = {
        "tasks": {
            "piqa": {**task, "column": "PIQA", "value": 0.6, "chance": 0.5},
            "siqa": {**task, "column": "SIQA", "value": 0.4, "chance": 1 / 3},
        },
        "average": {"value": 0.5, "tasks": 2, "of": 2},
        "settings": {},
    }
    lines = format_markdown(report, "mine").splitlines()
    assert lines[0].endswith("| avg of the 2 scored |")
    paper = next(line for line in lines if line.startswith("| MobiLlama 0.5B (paper)"))
    assert paper.endswith(f"| {(72.03 + 40.22) / 2:.2f} |")  # PIQA and SIQA of the paper's row, not 46.00
    chance = next(line for line in lines if line.startswith("| chance"))
    assert "| 50.00 | 33.33 |" in chance.replace("n/a | ", "") and chance.endswith(
        f"| {(50 + 100 / 3) / 2:.2f} |"
    )
    assert lines[7].endswith("| 50.00 |")


def test_chance_is_computed_from_the_documents_scored():
    raw = {
        "samples": {
            "offline_piqa": [{"doc_id": 0, "arguments": [1, 2]}, {"doc_id": 1, "arguments": [1, 2]}],
            "offline_arc": [{"doc_id": 0, "arguments": [1, 2, 3, 4]}, {"doc_id": 1, "arguments": [1, 2, 3]}],
            "offline_tqa": [
                {"doc_id": 0, "arguments": [1] * 4, "doc": {"mc2_targets": {"labels": [1, 0, 0, 0]}}}
            ],
        }
    }
    assert report_module._chance(raw, "offline_piqa", "acc") == 0.5
    assert report_module._chance(raw, "offline_arc", "acc_norm") == pytest.approx((1 / 4 + 1 / 3) / 2)
    assert report_module._chance(raw, "offline_tqa", "acc") == 0.25
    assert report_module._chance(raw, "offline_crows", "pct_stereotype") == 0.5
    assert report_module._chance(raw, "missing", "acc") is None


def test_bad_report_files(tmp_path):
    (tmp_path / "a.json").write_text("{oops")
    (tmp_path / "b.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(MobiLlamaError, match="not a JSON report"):
        load_report(tmp_path / "a.json")
    with pytest.raises(MobiLlamaError, match="not a mobillama eval report"):
        load_report(tmp_path / "b.json")
    with pytest.raises(MobiLlamaError, match="report not found"):
        load_report(tmp_path / "c.json")


REAL_DATA = Path(os.environ.get("MOBILLAMA_EVAL_DATA", "~/.cache/mobillama/eval-data")).expanduser()


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_DATA / "manifest.json").is_file(),
                    reason=f"real benchmark data not cached at {REAL_DATA}: run 'mobillama eval fetch-data'")  # fmt: skip
def test_real_data_paper_tasks_run_offline(checkpoint):
    """Real benchmark rows from the registry packages (MMLU's 57 subjects left out to keep this short)."""
    names = [
        "hellaswag",
        "truthfulqa_mc2",
        "arc_challenge",
        "crows_pairs",
        "piqa",
        "race",
        "siqa",
        "winogrande",
    ]
    report = suites.run_suite(checkpoint, suites.get_tasks(names), data_dir=REAL_DATA, limit=2, batch_size=8)
    for name in names:
        status = report["tasks"][name]["status"]
        if name == "race":
            assert status == "not available offline"
        elif name == "truthfulqa_mc2" and status == "missing data":
            continue  # fetched without --truthfulqa
        else:
            assert status == "ok" and report["tasks"][name]["n"] == 2, name


def test_few_shot_sampling_is_deterministic_given_seed(checkpoint, data_dir):
    import dataclasses

    from mobillama.eval.harness import MobiLlamaLM

    lm = MobiLlamaLM(pretrained=str(checkpoint), batch_size=8)
    spec = dataclasses.replace(suites.TASKS["piqa"], num_fewshot=2)

    def prompts(seed):
        raw = suites._evaluate(lm, [spec], data_dir, 3, seed, online=False)
        return [
            s["arguments"][0][0] for s in sorted(raw["samples"]["offline_piqa"], key=lambda s: s["doc_id"])
        ]

    first = prompts(1)
    assert first == prompts(1)
    assert first != prompts(2)
    assert all(p.count("Question:") == 3 for p in first)  # two shots + the document itself


def test_quick_task_on_a_quantized_checkpoint(tied_checkpoints, data_dir, tmp_path, capsys):
    """A benchmark through the lm-eval model on an int8 checkpoint of a tied-embedding model, report
    written into folders that do not exist yet."""
    out = tmp_path / "runs" / "new" / "int8.json"
    argv = ["eval", str(tied_checkpoints["int8"]), "--tasks", "piqa", "--data-dir", str(data_dir),
            "--limit", "4", "--batch-size", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = load_report(out)
    assert report["tasks"]["piqa"]["status"] == "ok" and report["tasks"]["piqa"]["n"] == 4
    assert report["settings"]["quantization"] == {"bits": 8, "group_size": None}
    assert out.with_suffix(".md").is_file() and "| piqa | ok |" in capsys.readouterr().out
    float_report = suites.run_suite(
        tied_checkpoints["float"], suites.get_tasks(["piqa"]), data_dir=data_dir, limit=4, batch_size=2
    )
    assert float_report["settings"]["quantization"] is None
