"""Quality on real weights: perplexity of every precision and kernel against llama.cpp, in one run.

The real model is SmolLM2-135M-Instruct (``mobillama fetch``, cached in ~/.cache/mobillama/models); the
text is Python's own reference topics (real English with code, installed with every Python). Both tools
score the same windows the same way: windows of 512 tokens, the second half of each scored
(``llama-perplexity``'s method; ``mobillama.eval.perplexity.windowed_perplexity`` here).

Rows: this project in fp32 / bf16 / int8 / int4 (group sizes, kernels as ``mobillama quantize`` and
``--int8-kernel``/``--int4-kernel`` pick them) and llama.cpp on the shipped Q4_1 file and on F16 / Q8_0 /
Q4_0 / Q4_K_M files that ``llama-quantize`` makes from this project's F16 export, so both tools quantize
the same weights. Prints a markdown table; ``--json`` writes the numbers.

    PYTHONPATH=src python benchmarks/real_quality.py [--windows 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from mobillama.convert import export_gguf
from mobillama.convert.fetch import cached_real_model
from mobillama.eval import llama_cpp
from mobillama.eval.perplexity import reference_text, windowed_perplexity
from mobillama.infer.load import load_for_inference
from mobillama.tokenizer import load_tokenizer

OURS = [  # (label, load_for_inference keyword arguments)
    ("fp32", {"dtype": "fp32"}),
    ("bf16", {"dtype": "bf16"}),
    ("int8 (auto kernel)", {"bits": 8}),
    ("int8 (auto kernel), head int8", {"bits": 8, "quantize_head": True}),
    ("int8 weight-only", {"bits": 8, "int8_kernel": "weight_only"}),
    ("int8 fbgemm dynamic", {"bits": 8, "int8_kernel": "dynamic"}),
    ("int4 g32 (auto kernel)", {"bits": 4, "group_size": 32}),
    ("int4 g32 (auto kernel), head int8", {"bits": 4, "group_size": 32, "head_bits": 8}),
    ("int4 g32 (auto kernel), head int4", {"bits": 4, "group_size": 32, "quantize_head": True}),
    ("int4, default group (auto kernel)", {"bits": 4}),
    ("int4 g32 reference (float activations)", {"bits": 4, "group_size": 32, "int4_kernel": "reference"}),
]
LLAMA_CPP = ["F16", "Q8_0", "Q4_0", "Q4_K_M"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16, help="512-token windows scored (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both tools (default 2)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gguf_file, ckpt = cached_real_model("smollm2-135m-instruct")
    tok = load_tokenizer(ckpt)
    text = reference_text(40_000 * max(1, args.windows // 4))
    ids = tok.encode(text, parse_special=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mobillama-quality-") as tmp:
        text_file = Path(tmp) / "text.txt"
        text_file.write_text(text, encoding="utf-8")
        for label, kwargs in OURS:
            t0 = time.perf_counter()
            model = load_for_inference(ckpt, **kwargs).eval()
            r = windowed_perplexity(model, ids, max_windows=args.windows)
            rows.append({"tool": "mobillama", "variant": label, **r, "seconds": time.perf_counter() - t0})
            print(f"{label}: {r['perplexity']:.4f}", file=sys.stderr)
            del model
        if llama_cpp.tools_dir() is None:
            print(f"llama.cpp rows skipped: {llama_cpp.BUILD_HINT}", file=sys.stderr)
        else:
            files = {"Q4_1 (shipped file)": gguf_file}
            f16 = Path(tmp) / "F16.gguf"
            export_gguf(ckpt, f16, gguf_type="f16")
            for qtype in LLAMA_CPP:
                files[qtype] = (
                    f16 if qtype == "F16" else llama_cpp.quantize(f16, Path(tmp) / f"{qtype}.gguf", qtype)
                )
            for label, path in files.items():
                r = llama_cpp.perplexity(path, text_file, chunks=args.windows, threads=args.threads)
                rows.append({"tool": "llama.cpp", "variant": label, **r})
                print(f"llama.cpp {label}: {r['perplexity']:.4f}", file=sys.stderr)
    base = next(r["perplexity"] for r in rows if r["variant"] == "fp32")
    print(
        f"\nSmolLM2-135M-Instruct, {args.windows} windows of 512 tokens (second half scored), "
        f"{args.threads} threads\n"
    )
    print("| tool | variant | perplexity | ± | vs mobillama fp32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        change = (r["perplexity"] / base - 1) * 100
        print(
            f"| {r['tool']} | {r['variant']} | {r['perplexity']:.3f} | {r['perplexity_stderr']:.3f} | "
            f"{change:+.2f}% |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
