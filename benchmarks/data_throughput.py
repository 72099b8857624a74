"""Throughput and memory of ``mobillama data prepare`` against a plain single-process tokenizer loop.

Corpus: real text, the Python standard library's documents (code + pydoc topics) written one file per
document, cycled until the target size (~50 MB by default, ~10 MB for the memory comparison).

Measured, each in a fresh process so peak RSS is its own:
* ``plain loop``: read each file, ``Tokenizer.encode`` it, count tokens (one process, one thread);
* ``prepare, 1 worker`` / ``prepare, 2 workers``: the whole command (hash sources, tokenize, split,
  pack, hash and write shards, manifest).
Printed: tokens/s and the ratio to the plain loop measured in the same run (compare ratios, not
absolute numbers: the machine may be shared), and peak RSS of the main process and of the workers at
two corpus sizes (flat memory means the peak does not grow with the corpus).

    PYTHONPATH=src python benchmarks/data_throughput.py [--mb 50] [--small-mb 10] [--tokenizer PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TOKENIZER = Path("~/.cache/mobillama/test-assets/tokenizer.model.v1").expanduser()


def build_corpus(directory: Path, megabytes: float) -> tuple[int, int]:
    """Write stdlib documents, one per file, cycling until ``megabytes``; returns (files, bytes)."""
    from mobillama.data.sources import iter_texts, stdlib_sources

    directory.mkdir(parents=True)
    target, written, n = int(megabytes * 1e6), 0, 0
    while written < target:
        for text in iter_texts(stdlib_sources()):
            data = text.encode("utf-8")
            (directory / f"{n:06d}.txt").write_bytes(data)
            written += len(data)
            n += 1
            if written >= target:
                break
    return n, written


def peak_rss_mb() -> tuple[float, float]:
    """(this process, its largest waited-for child) peak resident memory in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    from mobillama.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    start = time.perf_counter()
    if args.mode == "plain":
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        tokens = 0
        for path in sorted(Path(args.corpus).iterdir()):
            tokens += len(tok.encode(path.read_text(encoding="utf-8"), parse_special=False))
    else:
        from mobillama.data.prepare import prepare_corpus

        m = prepare_corpus(
            [args.corpus],
            tok,
            args.out,
            seq_len=2048,
            workers=args.workers,
            val_fraction=0.01,
            progress=False,
        )
        tokens = m["tokens"]["documents"]
    seconds = time.perf_counter() - start
    own, children = peak_rss_mb()
    print(json.dumps({"tokens": tokens, "seconds": seconds, "rss_main_mb": own, "rss_workers_mb": children}))


def run_child(mode: str, corpus: Path, tokenizer: str, workers: int, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--corpus", str(corpus), "--tokenizer", tokenizer]
    cmd += ["--workers", str(workers), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{mode} run failed:\n{result.stderr[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=50, help="corpus size for the throughput comparison (MB)")
    p.add_argument("--small-mb", type=float, default=10, help="smaller corpus for the memory comparison (MB)")
    p.add_argument(
        "--tokenizer", default=str(DEFAULT_TOKENIZER), help="tokenizer (default: the 32k SentencePiece model)"
    )
    p.add_argument("--child", choices=["plain", "prepare"], help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.mode = args.child
        return child(args)
    if not Path(args.tokenizer).exists():
        sys.exit(
            f"tokenizer {args.tokenizer} not found (run the tokenizer tests once to fetch it, or pass --tokenizer)"
        )

    work = Path(tempfile.mkdtemp(prefix="mobillama-bench-"))
    try:
        big_files, big_bytes = build_corpus(work / "big", args.mb)
        small_files, small_bytes = build_corpus(work / "small", args.small_mb)
        print(
            f"corpus: {big_bytes / 1e6:.1f} MB in {big_files} files; {small_bytes / 1e6:.1f} MB in {small_files} files"
        )
        print(f"tokenizer: {args.tokenizer}; CPUs: {os.cpu_count()}; load average {os.getloadavg()[0]:.2f}")
        big, small = f"({args.mb:g} MB)", f"({args.small_mb:g} MB)"
        plain = run_child("plain", work / "big", args.tokenizer, 1, work / "o")
        rows = [(f"plain loop {big}", plain, True)]
        for corpus, label, compare in ((work / "big", big, True), (work / "small", small, False)):
            for w in (1, 2):
                result = run_child("prepare", corpus, args.tokenizer, w, work / "o")
                rows.append((f"prepare, {w} worker{'s' * (w > 1)} {label}", result, compare))
        base = plain["tokens"] / plain["seconds"]
        print(
            "\n| run | tokens | seconds | tokens/s | vs plain loop | peak RSS main (MB) | peak RSS worker (MB) |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, r, compare in rows:
            rate = r["tokens"] / r["seconds"]
            ratio = f"{rate / base:.2f}x" if compare else "-"
            print(
                f"| {name} | {r['tokens']:,} | {r['seconds']:.1f} | {rate:,.0f} | {ratio} | "
                f"{r['rss_main_mb']:.0f} | {r['rss_workers_mb']:.0f} |"
            )
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
