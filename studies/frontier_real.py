"""Memory/quality frontier: weight bytes and decode peak RSS against perplexity, dense vs shared, per precision.

Each model (the dense SmolLM2-135M-Instruct and the healed shared models of ``studies/heal_real.py``, seed 0)
is run by ``mobillama bench`` in its own process at bf16, int8 (head int8) and int4 g32 (head int8: the
layout of llama.cpp's Q4_1 file), which reports the bytes of weights held, the peak RSS while decoding,
decode speed and perplexity on ``reference_text()`` (512-token windows, second half scored). Prints a
markdown table and writes ``frontier.json`` and ``frontier.png`` (perplexity against weight bytes, one line
per model) under ``--out``. The question it answers: does sharing (+ healing) ever beat plain quantization
of the dense model at equal bytes?

    PYTHONPATH=src python studies/frontier_real.py --study runs/heal-study --out runs/heal-study
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mobillama.convert.fetch import cached_real_model  # noqa: E402
from mobillama.eval.perplexity import reference_text  # noqa: E402

PRECISIONS = {  # label -> mobillama bench options
    "bf16": ["--dtype", "bf16"],
    "int8": ["--bits", "8", "--head-bits", "8"],
    "int4 g32": ["--bits", "4", "--group-size", "32", "--head-bits", "8"],
}


def models(study: Path, steps: int, source: Path) -> dict[str, Path]:
    """label -> checkpoint: the dense source, then each healed shared model (seed 0) the study holds."""
    found = {"dense (30 FFNs)": source}
    for run in sorted((study / "healed").glob("*-seed0")):
        name = run.name.removesuffix("-seed0")
        ckpt = run / "checkpoints" / f"step-{steps:08d}"
        if name != "control" and (ckpt / "model.safetensors").is_file():
            found[f"{name.replace('group-', 'group:').replace('_', '+')} healed"] = ckpt
    return found


def bench(ckpt: Path, options: list[str], text: Path, windows: int, threads: int) -> dict:
    cmd = [
        sys.executable, "-m", "mobillama", "bench", str(ckpt), *options, "--threads", str(threads),
        "--new-tokens", "64", "--perplexity-text", str(text), "--perplexity-windows", str(windows), "--json",
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy()).stdout
    return json.loads(out[out.index("{") :])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, type=Path, help="the heal_real.py study directory")
    parser.add_argument("--out", required=True, type=Path, help="where frontier.json / frontier.png go")
    parser.add_argument("--steps", type=int, default=30, help="healing steps of the study (default 30)")
    parser.add_argument("--windows", type=int, default=16, help="512-token windows scored (default 16)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    text = args.out / "reference_text.txt"
    text.write_text(reference_text(6000 * args.windows), encoding="utf-8")
    rows = []
    for label, ckpt in models(args.study, args.steps, cached_real_model("smollm2-135m-instruct")[1]).items():
        for precision, options in PRECISIONS.items():
            r = bench(ckpt, options, text, args.windows, args.threads)
            row = {
                "model": label,
                "precision": precision,
                "checkpoint": str(ckpt),
                "weight_mb": r["model_bytes"] / 1e6,
                "peak_rss_mb": r["peak_rss_bytes"] / 1e6,
                "perplexity": r["perplexity"]["perplexity"],
                "decode_tok_s": r["decode_tok_s"],
            }
            rows.append(row)
            print(f"{label} {precision}: {row}", file=sys.stderr, flush=True)
    (args.out / "frontier.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(
        f"\nperplexity on reference_text(), {args.windows} windows of 512; mobillama bench, {args.threads} threads\n"
    )
    print("| model | precision | weights MB | peak RSS at decode MB | perplexity | decode tok/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['precision']} | {r['weight_mb']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['perplexity']:.4g} | {r['decode_tok_s']:.1f} |"
        )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((r["weight_mb"], r["perplexity"], r["precision"]) for r in rows if r["model"] == label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for x, y, precision in pts:
            ax.annotate(precision, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("weights held for inference (MB)")
    ax.set_ylabel("perplexity (reference text, lower is better)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: dense vs shared FFN (merged + healed), bf16 / int8 / int4")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "frontier.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
