"""Decode speed on the mobillama-0.5b shape: this project's decoder vs transformers ``generate``, in one run.

Every variant runs in its own subprocess (clean peak-RSS figures, no allocator carry-over) on the same
random weights (seeded), batch 1, greedy, with the same thread count:

- transformers ``LlamaForCausalLM.generate`` in bf16 with PyTorch defaults, and "tuned" with oneDNN
  disabled (the fair peer: oneDNN's bf16 matrix-vector path is ~2x slower here); the shared FFN is one ``LlamaMLP`` object reused by
  every layer, so the peer holds the same weights in the same memory;
- this project (``mobillama bench``), loading the same weights from checkpoints written once at the
  start (bf16, and int8 / int4 group 128 by ``mobillama quantize``), as a user would: bf16; int8 and int4
  on the project's AVX-512 VNNI kernels (``mobillama.kernels``) and on PyTorch's stock ones (fbgemm
  dynamic int8, the stock int4 kernel); the vnni variants also with the FFN duplicated per layer, to see
  whether sharing speeds decode.

The machine is shared: only ratios measured in one run mean anything. The load average is printed.

    python benchmarks/decode.py [--rounds 3] [--threads 2] [--prompt-len 128] [--new-tokens 128] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PRESET = "mobillama-0.5b"

# (label, which checkpoint, extra `mobillama bench` arguments). The checkpoints hold the preset's seeded
# random weights: "bf16" as saved, "int8"/"int4" written by `mobillama quantize` from it, so every variant
# loads its weights the way a user's would (speed does not depend on the values).
VARIANTS = [
    ("mobillama bf16", "bf16", []),
    ("mobillama int8 vnni", "int8", ["--int8-kernel", "vnni"]),
    ("mobillama int8 vnni, FFN x22", "int8", ["--int8-kernel", "vnni", "--duplicate-ffn"]),
    ("mobillama int8 fbgemm dynamic", "int8", ["--int8-kernel", "dynamic"]),
    ("mobillama int4 g128 vnni", "int4", ["--int4-kernel", "vnni"]),
    ("mobillama int4 g128 vnni, FFN x22", "int4", ["--int4-kernel", "vnni", "--duplicate-ffn"]),
    ("mobillama int4 g128 stock", "int4", ["--int4-kernel", "stock"]),
]


def write_checkpoints(root: str) -> dict[str, str]:
    """The preset's seeded weights as a bf16 checkpoint and its int8 / int4 (group 128) quantizations."""
    from mobillama.checkpoint import save_checkpoint
    from mobillama.generate import load_for_inference

    dirs = {name: os.path.join(root, name) for name in ("bf16", "int8", "int4")}
    model = load_for_inference(PRESET, dtype="bf16", seed=0)
    save_checkpoint(model.state_dict(), model.config, dirs["bf16"])
    del model
    for name, extra in (("int8", ["--bits", "8"]), ("int4", ["--bits", "4", "--group-size", "128"])):
        cmd = ["-m", "mobillama", "quantize", dirs["bf16"], *extra, "--out", dirs[name]]
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=_env())
        if proc.returncode != 0:
            raise SystemExit(f"quantize failed: {proc.stderr.strip()}")
    return dirs


def run_peer(mkldnn: bool, threads: int, prompt_len: int, new_tokens: int) -> dict:
    """transformers generate on LlamaForCausalLM carrying this project's seeded 0.5b weights."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from mobillama.bench import _reset_peak_rss, _status_kb, measure_read_bandwidth
    from mobillama.convert.to_llama import llama_config
    from mobillama.generate import load_for_inference

    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn
    ours = load_for_inference(PRESET, dtype="bf16", seed=0)
    c = ours.config
    cfg = llama_config(c, torch.bfloat16)  # the exporter's mapping: one definition of the Llama twin
    with torch.device("meta"):
        llama = LlamaForCausalLM(cfg)
    for layer in llama.model.layers:
        layer.mlp = llama.model.layers[0].mlp  # one MLP object, as in MobiLlama
    state = {k.replace("model.ffns.0.", "model.layers.0.mlp."): v for k, v in ours.state_dict().items()}
    llama.load_state_dict(state, strict=False, assign=True)
    llama.model.rotary_emb = LlamaRotaryEmbedding(cfg)
    llama.eval()
    del ours, state
    weight_bytes = sum(p.numel() * p.element_size() for p in llama.parameters())
    ids = torch.randint(3, c.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        llama.generate(ids[:, :16], max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        _reset_peak_rss()
        t0 = time.perf_counter()
        llama.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = llama.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - t0
    assert out.shape[1] == prompt_len + new_tokens
    decode = (new_tokens - 1) / (total - ttft)
    bw = measure_read_bandwidth()
    return {
        "decode_tok_s": decode,
        "prefill_tok_s": prompt_len / ttft,
        "ttft_s": ttft,
        "model_bytes": weight_bytes,
        "peak_rss_bytes": _status_kb("VmHWM") * 1024,
        "roofline_gb_s": bw,
    }


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in [os.path.abspath("src"), os.environ.get("PYTHONPATH", "")] if p
        ),
    }


def subprocess_json(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit {proc.returncode}"
        }
    return json.loads(proc.stdout)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(rounds: list[dict[str, dict]], args: argparse.Namespace) -> None:
    """Medians over rounds; ratios are taken within each round (same machine state), then the median."""
    base_label, tuned_label = "transformers bf16 (defaults)", "transformers bf16 (mkldnn off)"
    labels = list(rounds[0])
    print(
        f"{PRESET}, batch 1, {args.threads} threads, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"greedy; median of {len(rounds)} round(s), every variant once per round"
    )
    header = (
        f"{'variant':<34} {'decode tok/s':>12} {'x HF':>6} {'x HF tuned':>10} {'x HF per round':>16} "
        f"{'% roofline':>10} {'prefill tok/s':>13} {'TTFT ms':>8} {'RSS/weights':>11}"
    )
    print(header)
    print("-" * len(header))
    for label in labels:
        runs = [r[label] for r in rounds if "error" not in r[label]]
        if not runs:
            print(f"{label:<34} error: {rounds[0][label].get('error')}")
            continue
        ok = [r for r in rounds if "error" not in r[label]]
        ratios = [
            r[label]["decode_tok_s"] / r[base_label]["decode_tok_s"]
            for r in ok
            if "error" not in r[base_label]
        ]
        tuned = [
            r[label]["decode_tok_s"] / r[tuned_label]["decode_tok_s"]
            for r in ok
            if "error" not in r[tuned_label]
        ]
        roof = [100 * x["fraction_of_roofline"] for x in runs if "fraction_of_roofline" in x]
        per_round = " ".join(f"{x:.2f}" for x in ratios)
        print(
            f"{label:<34} {median([x['decode_tok_s'] for x in runs]):>12.2f} {median(ratios):>6.2f} "
            f"{median(tuned):>10.2f} {per_round:>16} {(f'{median(roof):.0f}%' if roof else '-'):>10} "
            f"{median([x['prefill_tok_s'] for x in runs]):>13.1f} {median([1000 * x['ttft_s'] for x in runs]):>8.0f} "
            f"{median([x['peak_rss_bytes'] / x['model_bytes'] for x in runs]):>11.2f}"
        )
    bws = [r["roofline_gb_s"] for rnd in rounds for r in rnd.values() if "roofline_gb_s" in r]
    if bws:
        print(f"measured read bandwidth: {min(bws):.1f}-{max(bws):.1f} GB/s across runs")
    for label in labels:
        runs = [r[label] for r in rounds if "bytes_per_token" in r[label]]
        if runs:
            r = runs[0]
            print(
                f"  {label}: {r['bytes_per_token'] / 1e9:.3f} GB read/token "
                f"(FFN once: {r['unique_bytes_per_token'] / 1e9:.3f}), weights {r['model_bytes'] / 1e9:.3f} GB, "
                f"peak RSS {median([x['peak_rss_bytes'] for x in runs]) / 1e9:.3f} GB"
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every variant")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to decode")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every variant this many times, one after another per round, and report medians "
        "(ratios are taken within a round); the machine's speed drifts, so 3 or more is advisable",
    )
    p.add_argument("--json", help="also write all results to this JSON file")
    p.add_argument("--peer", choices=["default", "tuned"], help=argparse.SUPPRESS)  # internal: one peer run
    args = p.parse_args()
    if args.peer:
        print(json.dumps(run_peer(args.peer == "default", args.threads, args.prompt_len, args.new_tokens)))
        return 0
    common = [
        "--threads",
        str(args.threads),
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(args.new_tokens),
    ]
    workdir = tempfile.TemporaryDirectory(prefix="mobillama-decode-")
    checkpoints = write_checkpoints(workdir.name)
    print("checkpoints written", file=sys.stderr)
    load_before = os.getloadavg()
    peers = [("transformers bf16 (defaults)", "default"), ("transformers bf16 (mkldnn off)", "tuned")]
    rounds: list[dict[str, dict]] = []
    for number in range(1, args.rounds + 1):
        results: dict[str, dict] = {}
        for label, mkldnn in peers:
            results[label] = subprocess_json([__file__, "--peer", mkldnn, *common])
            print(f"round {number}: done {label}", file=sys.stderr)
        for label, source, extra in VARIANTS:
            cmd = ["-m", "mobillama", "bench", checkpoints[source], "--json", *common, *extra]
            results[label] = subprocess_json(cmd)
            print(f"round {number}: done {label}", file=sys.stderr)
        rounds.append(results)
    load_after = os.getloadavg()
    workdir.cleanup()
    print_table(rounds, args)
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2 vCPUs shared with others)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rounds": rounds, "load_before": load_before, "load_after": load_after}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
