"""Merging a real pretrained model's FFNs: perplexity of SmolLM2-135M-Instruct shared by `mobillama share`.

For each sharing degree (FFN shared by groups of 2, 3, 5, 10 layers, or by all 30) and each strategy
(plain ``mean``, ``layer:0``, ``aligned``, ``aligned`` with activation weighting, ``aligned:auto`` with
activation weighting), merge the imported model's 30 FFNs and score the result on
``reference_text()`` with ``windowed_perplexity`` (llama.cpp's method: 512-token windows, second half
scored). No training: this is the starting point that healing (``pretrain --distill-from``) continues from.
The calibration text of the activation-based options is ``share.calibration_text()`` (standard-library
docstrings), not the evaluation text. Prints a markdown table; ``--json`` writes the numbers.

    PYTHONPATH=src python studies/merge_real.py [--windows 4] [--sharing group:2 all] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mobillama.checkpoint import load_checkpoint
from mobillama.eval.perplexity import reference_text, windowed_perplexity
from mobillama.tokenizer import load_tokenizer
from mobillama.train import share

CKPT = Path("~/.cache/mobillama/models/smollm2-135m-instruct/checkpoint").expanduser()
SHARING = ["group:2", "group:3", "group:5", "group:10", "all"]
STRATEGIES = {  # column label -> (strategy, share_state options)
    "mean": ("mean", {}),
    "layer:0": ("layer:0", {}),
    "aligned": ("aligned", {}),
    "aligned, act.-weighted": ("aligned", {"weighting": "activation"}),
    "aligned:auto, act.-weighted": ("aligned:auto", {"weighting": "activation"}),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4, help="512-token windows scored (default 4)")
    parser.add_argument("--sharing", nargs="+", default=SHARING, help=f"sharing degrees (default {SHARING})")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (CKPT / "model.safetensors").is_file():
        print(
            f"the imported SmolLM2-135M-Instruct is not cached at {CKPT} (mobillama fetch)", file=sys.stderr
        )
        return 2
    config, state = load_checkpoint(CKPT)
    ids = load_tokenizer(CKPT).encode(reference_text(6000 * args.windows), parse_special=False)
    calibration = share.load_calibration_ids(CKPT, None, share.CALIBRATION_TOKENS)

    def perplexity(cfg, st) -> float:
        return windowed_perplexity(share._build(cfg, st), ids, max_windows=args.windows)["perplexity"]

    rows = [{"sharing": "none", "strategy": "-", "perplexity": perplexity(config, state), "merge_s": 0.0}]
    print(f"none: {rows[0]['perplexity']:.3f}", file=sys.stderr)
    for sharing in args.sharing:
        target = config.replace(ffn_sharing=sharing)
        for label in args.strategies:
            strategy, options = STRATEGIES[label]
            t0 = time.perf_counter()
            merged = share.share_state(
                state, config, target, strategy, calibration_ids=calibration, **options
            )
            seconds = time.perf_counter() - t0
            ppl = perplexity(target, merged)
            rows.append({"sharing": sharing, "strategy": label, "perplexity": ppl, "merge_s": seconds})
            print(f"{sharing} {label}: {ppl:.4g} (merge {seconds:.0f} s)", file=sys.stderr)
    print(
        f"\nSmolLM2-135M-Instruct, FFNs merged without training; perplexity on reference_text(), "
        f"{args.windows} windows of 512 tokens (second half scored); unshared: {rows[0]['perplexity']:.2f}\n"
    )
    print("| sharing | " + " | ".join(args.strategies) + " | mean / best aligned |")
    print("|---" * (len(args.strategies) + 2) + "|")
    for sharing in args.sharing:
        ppl = {r["strategy"]: r["perplexity"] for r in rows if r["sharing"] == sharing}
        aligned = [v for k, v in ppl.items() if k.startswith("aligned")]
        factor = f"{ppl['mean'] / min(aligned):.3g}x" if aligned and "mean" in ppl else "-"
        print(f"| {sharing} | " + " | ".join(f"{ppl[s]:.3g}" for s in args.strategies) + f" | {factor} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
