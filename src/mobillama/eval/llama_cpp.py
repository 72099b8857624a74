"""llama.cpp, the peer every quality and speed figure is checked against: find and run its tools.

llama.cpp is not a Python dependency: ``scripts/build_llama_cpp.sh`` builds its command-line tools from
the ``llama-cpp-python`` source distribution on PyPI (which vendors llama.cpp) into
``~/.cache/mobillama/llama.cpp/VERSION/bin``. This module finds them there (or under
``$MOBILLAMA_LLAMA_CPP``) and wraps the four calls the tests and benchmarks make: tokenize a text,
measure perplexity on a text file, continue a prompt greedily, and quantize a GGUF file. Each returns
parsed values; a tool that fails raises :class:`~mobillama.errors.MobiLlamaError` with its last line.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from mobillama.errors import MobiLlamaError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TOOLS = ("llama-tokenize", "llama-perplexity", "llama-bench", "llama-quantize", "llama-simple")
BUILD_HINT = "build them with: bash scripts/build_llama_cpp.sh (about 5 minutes on 2 cores, cached)"


def tools_dir() -> Path | None:
    """The folder holding llama.cpp's tools, or None where they are not built."""
    env = os.environ.get("MOBILLAMA_LLAMA_CPP")
    candidates = [Path(env)] if env else []
    cache = Path(os.environ.get("MOBILLAMA_CACHE", "~/.cache/mobillama")).expanduser()
    candidates.append(cache / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION / "bin")
    for folder in candidates:
        if all((folder / t).is_file() and os.access(folder / t, os.X_OK) for t in TOOLS):
            return folder
    return None


def tool(name: str) -> Path:
    folder = tools_dir()
    if folder is None:
        raise MobiLlamaError(f"llama.cpp's {name} was not found; {BUILD_HINT}")
    return folder / name


def _run(args: list[str], *, timeout: float = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, errors="replace")
    if proc.returncode != 0:
        last = ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]
        raise MobiLlamaError(f"{Path(args[0]).name} failed (exit {proc.returncode}): {last[:300]}")
    return proc


def tokenize(
    gguf_file: str | Path, text: str, *, add_bos: bool = False, parse_special: bool = False
) -> list[int]:
    """llama.cpp's token ids for ``text`` (read verbatim from a file, so no shell or newline handling)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        f.write(text)
    try:
        args = [
            str(tool("llama-tokenize")),
            "-m",
            str(gguf_file),
            "-f",
            f.name,
            "--ids",
            "--log-disable",
            "--no-escape",
        ]
        if not add_bos:
            args.append("--no-bos")
        if not parse_special:
            args.append("--no-parse-special")
        out = _run(args).stdout.strip().splitlines()
    finally:
        os.unlink(f.name)
    line = next((s for s in reversed(out) if s.startswith("[")), None)
    if line is None:
        raise MobiLlamaError("llama-tokenize printed no id list")
    return [int(x) for x in line.strip("[]").split(",") if x.strip()]


_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def perplexity(
    gguf_file: str | Path,
    text_file: str | Path,
    *,
    ctx: int = 512,
    threads: int = 2,
    chunks: int | None = None,
) -> dict:
    """``llama-perplexity`` on ``text_file``: windows of ``ctx`` tokens, second half of each scored."""
    args = [str(tool("llama-perplexity")), "-m", str(gguf_file), "-f", str(text_file), "-c", str(ctx)]
    args += ["-b", str(ctx), "-t", str(threads)]
    if chunks is not None:
        args += ["--chunks", str(chunks)]
    proc = _run(args)
    m = _PPL.search(proc.stdout + proc.stderr)
    if m is None:
        raise MobiLlamaError("llama-perplexity printed no final estimate")
    return {"perplexity": float(m.group(1)), "perplexity_stderr": float(m.group(2)), "ctx": ctx}


def greedy(gguf_file: str | Path, prompt: str, n_tokens: int) -> str:
    """The text llama.cpp's ``llama-simple`` (greedy sampler) appends to ``prompt`` in ``n_tokens`` steps.

    llama-simple tokenizes the prompt with BOS where the vocabulary adds it and special tokens parsed,
    echoes the prompt, stops early at an end-of-generation token (not printed) and ends with a newline of
    its own; the echo and that newline are cut off here.
    """
    out = _run([str(tool("llama-simple")), "-m", str(gguf_file), "-n", str(n_tokens), prompt]).stdout
    start = out.find(prompt)
    if start < 0 or not out.endswith("\n"):
        raise MobiLlamaError("llama-simple's output is not the echoed prompt and its continuation")
    return out[start + len(prompt) : -1]


def quantize(src: str | Path, out: str | Path, qtype: str, *, threads: int = 2) -> Path:
    """``llama-quantize SRC OUT TYPE`` (TYPE such as Q4_0, Q8_0, Q4_K_M): llama.cpp's own quantizer."""
    _run([str(tool("llama-quantize")), str(src), str(out), qtype, str(threads)])
    return Path(out)
