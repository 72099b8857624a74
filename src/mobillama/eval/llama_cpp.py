"""llama.cpp, the peer every quality and speed figure is checked against: find and run its tools.

llama.cpp is not a Python dependency: ``scripts/build_llama_cpp.sh`` builds its command-line tools from
the ``llama-cpp-python`` source distribution on PyPI (which vendors llama.cpp) into
``~/.cache/mobillama/llama.cpp/VERSION/bin``. This module finds them there (or under
``$MOBILLAMA_LLAMA_CPP``) and wraps the five calls the tests and benchmarks make: tokenize a text,
measure perplexity on a text file, continue a prompt greedily, quantize a GGUF file, and time prefill and
decode with ``llama-bench``. Each returns parsed values; a tool that fails raises :class:`~mobillama.errors.MobiLlamaError` with its last line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
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


def parse_bench_json(text: str) -> dict:
    """Prefill and decode tok/s from ``llama-bench -o json`` output (a list of tests: ``pp`` has
    ``n_gen == 0``, ``tg`` has ``n_prompt == 0``), with the model and build facts a table needs."""
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as e:
        raise MobiLlamaError(f"llama-bench printed no JSON ({e.msg})") from None
    if not isinstance(tests, list) or not tests or not all(isinstance(t, dict) for t in tests):
        raise MobiLlamaError("llama-bench's JSON is not a list of tests")
    result: dict = {}
    for t in tests:
        try:
            n_prompt, n_gen, avg = int(t["n_prompt"]), int(t["n_gen"]), float(t["avg_ts"])
        except (KeyError, TypeError, ValueError):
            raise MobiLlamaError("llama-bench's JSON test lacks n_prompt/n_gen/avg_ts") from None
        samples = [float(x) for x in t.get("samples_ts", [avg])]
        if n_prompt > 0 and n_gen == 0:
            result.update(prefill_tok_s=avg, prefill_samples_tok_s=samples, n_prompt=n_prompt)
        elif n_gen > 0 and n_prompt == 0:
            result.update(decode_tok_s=avg, decode_samples_tok_s=samples, n_gen=n_gen)
        for key in ("model_type", "model_size", "model_n_params", "n_threads", "build_commit", "cpu_info"):
            if key in t:
                result.setdefault(key, t[key])
    return result


# Runs the tool as its own child and writes that child's peak RSS (kB) to argv[1]. The wrapper is needed
# because Linux carries a process's peak RSS across exec: a tool forked straight from a large parent (a
# benchmark holding PyTorch) reports at least the parent's size. Forked from this small interpreter it
# does not, and RUSAGE_CHILDREN here covers only the tool.
_RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(code)\n"
)


def run_measured(args: list[str], *, timeout: float = 1800) -> tuple[str, str, int]:
    """(stdout, stderr, peak RSS in bytes) of one tool run, the peak being the tool's own (see
    ``_RSS_WRAPPER``). A run past ``timeout`` seconds is killed and raises; a failing one raises with its
    last line."""
    name = Path(args[0]).name
    with tempfile.TemporaryDirectory(prefix="mobillama-rss-") as tmp:
        rss_file = Path(tmp) / "maxrss"
        proc = subprocess.Popen(
            [sys.executable, "-c", _RSS_WRAPPER, str(rss_file), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,  # one process group: a timeout kills the tool too, not only the wrapper
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise MobiLlamaError(f"{name} was killed after {timeout:g} s") from None
        if proc.returncode != 0:
            last = ((stderr or stdout).strip().splitlines() or ["no output"])[-1]
            raise MobiLlamaError(f"{name} failed (exit {proc.returncode}): {last[:300]}")
        peak_kb = int(rss_file.read_text())  # Linux reports kilobytes
    return stdout, stderr, peak_kb * 1024


def bench(
    gguf_file: str | Path,
    *,
    threads: int = 2,
    n_prompt: int = 128,
    n_gen: int = 128,
    repetitions: int = 1,
    timeout: float = 1800,
) -> dict:
    """``llama-bench``: prefill tok/s of an ``n_prompt``-token prompt (``pp``) and decode tok/s over
    ``n_gen`` tokens from an empty context (``tg``), each the mean of ``repetitions`` runs after a warm-up,
    plus the process's peak RSS (loading included: llama-bench reports no separate steady state)."""
    for name, value, low in (
        ("threads", threads, 1),
        ("n_prompt", n_prompt, 1),
        ("n_gen", n_gen, 1),
        ("repetitions", repetitions, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise MobiLlamaError(f"{name} must be an integer >= {low}, got {value!r}")
    args = [str(tool("llama-bench")), "-m", str(gguf_file), "-p", str(n_prompt), "-n", str(n_gen)]
    args += ["-r", str(repetitions), "-t", str(threads), "-o", "json"]
    stdout, _, peak = run_measured(args, timeout=timeout)
    result = parse_bench_json(stdout)
    if "prefill_tok_s" not in result or "decode_tok_s" not in result:
        raise MobiLlamaError("llama-bench's JSON lacks the prefill (pp) or decode (tg) test")
    return {**result, "peak_rss_bytes": peak, "repetitions": repetitions}
