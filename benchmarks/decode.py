"""Decode speed on the mobillama-0.5b shape: this project's decoder vs transformers ``generate``, in one run.

Every variant runs in its own subprocess (clean peak-RSS figures, no allocator carry-over) on the same
random weights (seeded), batch 1, greedy, with the same thread count:

- transformers ``LlamaForCausalLM.generate`` in bf16 with PyTorch defaults, and "tuned" with oneDNN
  disabled (the fair peer, REFERENCE.md section 6); the shared FFN is one ``LlamaMLP`` object reused by
  every layer, so the peer holds the same weights in the same memory;
- this project (``mobillama bench``): bf16; int8 and int4 (group 128) on the project's AVX-512 VNNI
  kernels (``mobillama.kernels``) and on PyTorch's stock ones (fbgemm dynamic int8, the stock int4
  kernel); the vnni variants also with the FFN duplicated per layer, to see whether sharing speeds decode.

The machine is shared: only ratios measured in one run mean anything. The load average is printed.

    python benchmarks/decode.py [--threads 2] [--prompt-len 128] [--new-tokens 128] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PRESET = "mobillama-0.5b"

VARIANTS = [  # (label, extra `mobillama bench` arguments)
    ("mobillama bf16", []),
    ("mobillama int8 vnni", ["--bits", "8", "--int8-kernel", "vnni"]),
    ("mobillama int8 vnni, FFN x22", ["--bits", "8", "--int8-kernel", "vnni", "--duplicate-ffn"]),
    ("mobillama int8 fbgemm dynamic", ["--bits", "8", "--int8-kernel", "dynamic"]),
    ("mobillama int4 g128 vnni", ["--bits", "4", "--group-size", "128", "--int4-kernel", "vnni"]),
    (
        "mobillama int4 g128 vnni, FFN x22",
        ["--bits", "4", "--group-size", "128", "--int4-kernel", "vnni", "--duplicate-ffn"],
    ),
    ("mobillama int4 g128 stock", ["--bits", "4", "--group-size", "128", "--int4-kernel", "stock"]),
]


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


def subprocess_json(args: list[str]) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in [os.path.abspath("src"), os.environ.get("PYTHONPATH", "")] if p
        ),
    }
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit {proc.returncode}"
        }
    return json.loads(proc.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every variant")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to decode")
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
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    for label, mkldnn in (
        ("transformers bf16 (defaults)", "default"),
        ("transformers bf16 (mkldnn off)", "tuned"),
    ):
        results[label] = subprocess_json([__file__, "--peer", mkldnn, *common])
        print(f"done: {label}", file=sys.stderr)
    for label, extra in VARIANTS:
        results[label] = subprocess_json(["-m", "mobillama", "bench", PRESET, "--json", *common, *extra])
        print(f"done: {label}", file=sys.stderr)
    load_after = os.getloadavg()

    base = results["transformers bf16 (defaults)"].get("decode_tok_s")
    tuned = results["transformers bf16 (mkldnn off)"].get("decode_tok_s")
    header = f"{'variant':<34} {'decode tok/s':>12} {'x HF':>6} {'x HF tuned':>10} {'% roofline':>10} {'prefill tok/s':>13} {'TTFT ms':>8} {'RSS/weights':>11}"
    print(
        f"{PRESET}, batch 1, {args.threads} threads, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy"
    )
    print(header)
    print("-" * len(header))
    for label, r in results.items():
        if "error" in r:
            print(f"{label:<34} error: {r['error']}")
            continue
        d = r["decode_tok_s"]
        roof = f"{100 * r['fraction_of_roofline']:.0f}%" if "fraction_of_roofline" in r else "-"
        print(
            f"{label:<34} {d:>12.2f} {d / base if base else float('nan'):>6.2f} {d / tuned if tuned else float('nan'):>10.2f}"
            f" {roof:>10} {r['prefill_tok_s']:>13.1f} {1000 * r['ttft_s']:>8.0f} {r['peak_rss_bytes'] / r['model_bytes']:>11.2f}"
        )
    bws = [r["roofline_gb_s"] for r in results.values() if "roofline_gb_s" in r]
    if bws:
        print(f"measured read bandwidth: {min(bws):.1f}-{max(bws):.1f} GB/s across runs")
    for label, r in results.items():
        if "bytes_per_token" in r:
            print(
                f"  {label}: {r['bytes_per_token'] / 1e9:.3f} GB read/token "
                f"(FFN once: {r['unique_bytes_per_token'] / 1e9:.3f}), roofline {r['roofline_tok_s']:.1f} tok/s, "
                f"weights {r['model_bytes'] / 1e9:.3f} GB, peak RSS {r['peak_rss_bytes'] / 1e9:.3f} GB"
            )
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2 vCPUs shared with others)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"results": results, "load_before": load_before, "load_after": load_after}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
