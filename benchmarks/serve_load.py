"""Load test of ``mobillama serve`` on loopback: concurrent chat clients against a tiny model.

Starts the real server command as a subprocess (so its memory is measured apart from the clients) on a
random-weight micro checkpoint, then runs several rounds of REQUESTS chat requests from CLIENTS
concurrent clients (half streaming; a 429 is retried after its Retry-After, at most --retries times,
so the queue limit is exercised without most of the work being refused). Per round it prints
answered/429/5xx/lost counts, p50/p95 latency, completion tokens/s, and the server's RSS. The peer measured in the same run is the same generation
called directly (no HTTP, one request at a time): the ratio shows what the HTTP layer and queueing cost
or gain. Bounded: every request has a timeout and the whole run a deadline; loopback only.

    python benchmarks/serve_load.py                      # 4 rounds x 200 requests, 16 clients
    python benchmarks/serve_load.py --rounds 2 --requests 50

Exit status 1 if any request got a 5xx or was lost, or the server's RSS grew by more than 10% from the
second round to the last (the first round warms allocator pools and caches).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

PROMPTS = ["hello", "tell me a story", "what is a shared FFN?", "count to ten", "write a haiku about CPUs"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_request(client: httpx.Client, i: int, max_tokens: int) -> tuple[str, float, int]:
    """(outcome, seconds, completion tokens); outcome is 'ok', '429', '5xx', '4xx' or 'lost'."""
    body = {
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": i,
    }
    stream = i % 2 == 1
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    try:
        if stream:
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    return _status(r.status_code), time.perf_counter() - start, 0
                lines = [line for line in r.iter_lines() if line]
            if lines[-1] != "data: [DONE]":
                return "lost", time.perf_counter() - start, 0
            usage = json.loads(lines[-2].removeprefix("data: "))["usage"]
            return "ok", time.perf_counter() - start, usage["completion_tokens"]
        r = client.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            return _status(r.status_code), time.perf_counter() - start, 0
        return "ok", time.perf_counter() - start, r.json()["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, IndexError):
        return "lost", time.perf_counter() - start, 0


def _status(code: int) -> str:
    return "429" if code == 429 else "5xx" if code >= 500 else "4xx"


def run_round(
    url: str,
    requests: int,
    clients: int,
    max_tokens: int,
    offset: int,
    retries: int,
    retry_after: float = 1.0,
) -> dict:
    counter = iter(range(offset, offset + requests))
    rejected = [0]  # 429 answers that were retried
    lock = threading.Lock()
    results: list[tuple[str, float, int]] = []

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                for attempt in range(retries + 1):  # a 429 is retried after its Retry-After, boundedly
                    outcome = one_request(client, i, max_tokens)
                    if outcome[0] != "429" or attempt == retries:
                        break
                    with lock:
                        rejected[0] += 1
                    time.sleep(retry_after)
                results.append(outcome)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(client_loop)
    wall = time.perf_counter() - start
    ok = sorted(s for outcome, s, _ in results if outcome == "ok")
    tokens = sum(t for _, _, t in results)
    count = {k: sum(1 for o, _, _ in results if o == k) for k in ("ok", "429", "5xx", "4xx", "lost")}
    count["lost"] += requests - len(results)
    return {
        **count,
        "retried_429": rejected[0],
        "p50_s": statistics.median(ok) if ok else float("nan"),
        "p95_s": ok[min(len(ok) - 1, int(0.95 * len(ok)))] if ok else float("nan"),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "wall_s": wall,
    }


def direct_peer(checkpoint: Path, n: int, max_tokens: int, threads: int | None) -> float:
    """Tokens/s of the same generation called in-process, one request at a time (no HTTP)."""
    import torch

    from mobillama.infer.sampling import SamplingParams, chat_stop_strings
    from mobillama.serve.server import load_generator

    if threads:
        torch.set_num_threads(threads)
    generator = load_generator(checkpoint, dtype="bf16")
    tok = generator.tokenizer
    tokens, start = 0, time.perf_counter()
    for i in range(n):
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        ids = tok.encode_prompt(tok.apply_chat_template(messages))  # as the server encodes it
        stop = chat_stop_strings(tok)
        params = SamplingParams(max_new_tokens=max_tokens, temperature=0.7, seed=i, stop=stop)
        tokens += generator.generate_ids([ids], params)[0].completion_tokens
    return tokens / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of requests (default 4)")
    parser.add_argument("--requests", type=int, default=200, help="requests per round (default 200)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request (default 32)")
    parser.add_argument("--max-concurrency", type=int, default=2, help="server generation slots (default 2)")
    parser.add_argument("--queue-size", type=int, default=8, help="server queue size (default 8)")
    parser.add_argument(
        "--retries", type=int, default=10, help="times a client retries a 429 after Retry-After (default 10)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument(
        "--deadline", type=float, default=900, help="give up after this many seconds (default 900)"
    )
    args = parser.parse_args()

    from mobillama.serve.demo import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_tiny_checkpoint(Path(tmp) / "micro", "micro", context=256)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        cmd = [
            sys.executable,
            "-m",
            "mobillama",
            "serve",
            str(checkpoint),
            "--port",
            str(port),
            "--max-concurrency",
            str(args.max_concurrency),
            "--queue-size",
            str(args.queue_size),
            "--threads",
            str(args.threads),
            "--shutdown-timeout",
            "5",
        ]
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        failed = False
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url + "/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    print(server.stderr.read(), file=sys.stderr)
                    return 1
                time.sleep(0.2)
            start = time.monotonic()
            rounds = []
            for r in range(args.rounds):
                if time.monotonic() - start > args.deadline:
                    print(f"deadline reached after {r} round(s)")
                    break
                result = run_round(
                    url, args.requests, args.clients, args.max_tokens, r * args.requests, args.retries
                )
                result["rss_mb"] = rss_mb(server.pid)
                rounds.append(result)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        peer = direct_peer(checkpoint, 20, args.max_tokens, args.threads)

    print(
        f"\n{args.requests} chat requests/round from {args.clients} clients, max_tokens {args.max_tokens}, "
        f"server: {args.max_concurrency} slot(s), queue {args.queue_size}, {args.threads} torch thread(s)\n"
    )
    header = (
        "| round | ok | final 429 | 429s retried | 5xx | 4xx | lost | p50 s | p95 s | tokens/s | vs direct | "
        "server RSS MB |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for i, r in enumerate(rounds, 1):
        print(
            f"| {i} | {r['ok']} | {r['429']} | {r['retried_429']} | {r['5xx']} | {r['4xx']} | {r['lost']} | {r['p50_s']:.3f} | "
            f"{r['p95_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / peer:.2f}x | {r['rss_mb']:.0f} |"
        )
    print(f"| direct (no HTTP, sequential) | | | | | | | | | {peer:.0f} | 1.00x | |")
    if any(r["5xx"] or r["lost"] or r["4xx"] for r in rounds):
        print("FAIL: 5xx, 4xx or lost requests")
        failed = True
    if len(rounds) >= 3:
        growth = rounds[-1]["rss_mb"] / rounds[1]["rss_mb"] - 1
        print(f"server RSS from round 2 to round {len(rounds)}: {growth * 100:+.1f}%")
        if growth > 0.10:
            print("FAIL: memory grows across rounds")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
