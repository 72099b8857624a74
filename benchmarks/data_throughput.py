"""Throughput and memory of ``mobillama data prepare`` against a plain single-process tokenizer loop.

Corpus: real text, the Python standard library's documents (code + pydoc topics in path order) written
one file per document until ~10 MB; the ~50 MB corpus is that set of files repeated (same document mix,
five times the size).

Measured, each in a fresh process so peak RSS is its own:
* ``plain loop``: read each file, ``Tokenizer.encode`` it, count tokens (one process, one thread);
* ``prepare, 1 worker`` / ``prepare, 2 workers``: the whole command (hash sources, tokenize, split,
  pack, hash and write shards, manifest).
The three are run in interleaved rounds (plain, 1 worker, 2 workers, plain, ...) and the median of the
rounds is reported, so a burst of load from other users hits all of them alike. Printed: tokens/s and the
ratio to the plain loop of the same run; CPU seconds of the main process and of the worker processes
(load-independent: tokens per CPU second shows the pipeline's overhead); peak RSS of the main process and
of the largest worker at two corpus sizes (flat memory: the peak does not grow with the corpus).

    PYTHONPATH=src python benchmarks/data_throughput.py [--mb 50] [--small-mb 10] [--rounds 2] [--tokenizer PATH]
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
import threading
import time
from pathlib import Path

DEFAULT_TOKENIZER = Path("~/.cache/mobillama/test-assets/tokenizer.model.v1").expanduser()


def repeat_corpus(source: Path, directory: Path, megabytes: float) -> tuple[int, int]:
    """Copies of ``source``'s files until ``megabytes``: the same document mix at a larger size, so the
    memory comparison isolates corpus size (a plain prefix of the stdlib would add larger files)."""
    directory.mkdir(parents=True)
    files = sorted(source.iterdir())
    target, written, n = int(megabytes * 1e6), 0, 0
    while written < target:
        for f in files:
            data = f.read_bytes()
            (directory / f"{n:06d}.txt").write_bytes(data)
            written, n = written + len(data), n + 1
    return n, written


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


class ChildPeakRss:
    """Samples the peak RSS (VmHWM) of this process's live children from /proc (Linux).

    ``RUSAGE_CHILDREN`` cannot be used: importing torch already runs a ~240 MB helper child, which would
    hide the tokenizer workers' own figure.
    """

    def __init__(self) -> None:
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ChildPeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for task in Path("/proc/self/task").iterdir():
                try:
                    pids = (task / "children").read_text().split()
                except OSError:
                    continue
                for pid in pids:
                    try:
                        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                            if line.startswith("VmHWM:"):
                                self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                    except OSError:
                        pass


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    from mobillama.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    cpu0, children0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with ChildPeakRss() as workers_rss:
        if args.mode == "plain":
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            tokens = 0
            for path in sorted(Path(args.corpus).iterdir()):
                # bytes → str exactly as prepare does (read_text would translate \r\n)
                tokens += len(tok.encode(path.read_bytes().decode("utf-8"), parse_special=False))
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
    cpu1, children1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {
        "tokens": tokens,
        "seconds": seconds,
        "cpu_main_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
        "cpu_workers_s": children1.ru_utime + children1.ru_stime - children0.ru_utime - children0.ru_stime,
        "rss_main_mb": cpu1.ru_maxrss / 1024,
        "rss_worker_mb": workers_rss.peak_kb / 1024,
    }
    print(json.dumps(result))


def run_child(mode: str, corpus: Path, tokenizer: str, workers: int, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--corpus", str(corpus), "--tokenizer", tokenizer]
    cmd += ["--workers", str(workers), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if result.returncode != 0:
        sys.exit(f"{mode} run failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time (its other columns are from the same run)."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return ordered[(len(ordered) - 1) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=50, help="corpus size for the throughput comparison (MB)")
    p.add_argument("--small-mb", type=float, default=10, help="smaller corpus for the memory comparison (MB)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds on the large corpus (median)")
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
            f"tokenizer {args.tokenizer} not found (run tests/test_tokenizer.py once to fetch it, or pass --tokenizer)"
        )

    work = Path(tempfile.mkdtemp(prefix="mobillama-bench-"))
    try:
        small_files, small_bytes = build_corpus(work / "small", args.small_mb)
        big_files, big_bytes = repeat_corpus(work / "small", work / "big", args.mb)
        print(
            f"corpus: {big_bytes / 1e6:.1f} MB in {big_files} files; {small_bytes / 1e6:.1f} MB in {small_files} files"
        )
        print(
            f"tokenizer: {args.tokenizer}; CPUs: {os.cpu_count()}; load average before {os.getloadavg()[0]:.2f}"
        )
        big, small = f"{args.mb:g} MB", f"{args.small_mb:g} MB"
        configs = [
            ("plain loop", "plain", 1),
            ("prepare, 1 worker", "prepare", 1),
            ("prepare, 2 workers", "prepare", 2),
        ]
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
        for _ in range(args.rounds):
            for name, mode, workers in configs:
                runs[name].append(run_child(mode, work / "big", args.tokenizer, workers, work / "o"))
        rows = [(f"{name} ({big})", median_run(runs[name]), True) for name, _, _ in configs]
        for name, mode, workers in configs[1:]:
            rows.append(
                (
                    f"{name} ({small})",
                    run_child(mode, work / "small", args.tokenizer, workers, work / "o"),
                    False,
                )
            )
        base = rows[0][1]["tokens"] / rows[0][1]["seconds"]
        print(
            "\n| run | tokens | wall s | tokens/s | vs plain loop | CPU s main + workers | tokens per CPU s "
            "| peak RSS main (MB) | peak RSS per worker (MB) |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name, r, compare in rows:
            rate = r["tokens"] / r["seconds"]
            cpu = r["cpu_main_s"] + r["cpu_workers_s"]
            worker_rss = f"{r['rss_worker_mb']:.0f}" if r["rss_worker_mb"] else "-"
            print(
                f"| {name} | {r['tokens']:,} | {r['seconds']:.1f} | {rate:,.0f} | "
                f"{f'{rate / base:.2f}x' if compare else '-'} | {r['cpu_main_s']:.1f} + {r['cpu_workers_s']:.1f} | "
                f"{r['tokens'] / cpu:,.0f} | {r['rss_main_mb']:.0f} | {worker_rss} |"
            )
        print(
            "\nall wall times (s): "
            + "; ".join(f"{k}: {[round(r['seconds'], 1) for r in v]}" for k, v in runs.items())
        )
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
