"""Building the CPU kernels: the C sources compiled with the system compiler into a shared library,
cached under ``~/.cache/mobillama/kernels`` by a hash of the sources and the compiler (a changed source
or compiler builds a new library; an unchanged one is never rebuilt)."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = [
    Path(__file__).with_name(n)
    for n in (
        "gemv_avx512.c",
        "attention_avx512.c",
        "attention_train_avx512.c",
        "layer_avx512.c",
    )
]
# Compiled apart with AVX2 flags only: the kernels for CPUs without AVX-512, and the one-call decode step
# that chains either build's kernels (scalar glue, so it must not hold AVX-512 code of its own).
AVX2_SOURCES = [Path(__file__).with_name(n) for n in ("gemv_avx2.c", "layer_avx2.c", "decode_step.c")]
HEADERS = [Path(__file__).with_name(n) for n in ("simd_math.h", "attention_rows.h")]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")
AVX2_CPU_FLAGS = ("avx2", "fma", "f16c")


class KernelUnavailable(RuntimeError):
    """Raised when the kernels were asked for explicitly but cannot run on this machine."""


def cache_root() -> Path:
    """The project's cache of built things (``$MOBILLAMA_CACHE``, else ``~/.cache/mobillama``)."""
    return Path(os.environ.get("MOBILLAMA_CACHE") or Path.home() / ".cache" / "mobillama")


def cache_dir() -> Path:
    return cache_root() / "kernels"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _run(compiler: str, cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["(no output)"])[0]
        raise KernelUnavailable(f"building the CPU kernels with {compiler} failed: {first}")


def build_library() -> Path:
    """The compiled library for the current sources and compiler, built now if not cached."""
    compiler = _compiler()
    if compiler is None:
        raise KernelUnavailable("no C compiler (cc, gcc or clang) found to build the CPU kernels")
    digest = hashlib.sha256(compiler.encode())
    for source in [*SOURCES, *AVX2_SOURCES, *HEADERS]:
        digest.update(source.read_bytes())
    target = cache_dir() / f"mobillama_kernels-{digest.hexdigest()[:16]}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            common = ["-O3", "-std=c11", "-fopenmp", "-fPIC"]
            objects = [str(Path(tmp) / f"{source.stem}.o") for source in AVX2_SOURCES]
            for source, obj in zip(AVX2_SOURCES, objects, strict=True):
                _run(compiler, [compiler, *common, "-mavx2", "-mfma", "-mf16c", "-c", str(source), "-o", obj])
            _run(compiler, [compiler, *common, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma",
                            "-shared", *map(str, SOURCES), *objects, "-o", str(built), "-lm"])  # fmt: skip
            os.replace(built, target)  # atomic: a concurrent build leaves one complete file
    return target
