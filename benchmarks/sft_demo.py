"""SFT demonstration: pre-train a tiny base on stdlib code, instruction-tune it on the stdlib Q/A set.

Reports the held-out assistant-token loss before and after fine-tuning (same tokenizer, template and
masking), greedy answers to every held-out prompt from both models, and how many of those answers take
the assistant format of the training set (`` `signature`: summary`` ended by EOS). Everything runs through the public
commands (``mobillama tokenizer train``, ``data prepare``, ``pretrain``, ``sft build-data``, ``sft``).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/sft_demo.py --work runs/sft-demo

Minutes on 2 CPU cores. ``--base CKPT`` skips pre-training and fine-tunes an existing checkpoint.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import sysconfig
import time
from pathlib import Path

import torch


def newest_checkpoint(run_dir: Path) -> Path:
    from mobillama.train.state import list_checkpoints

    found = list_checkpoints(run_dir)
    if not found:
        raise SystemExit(f"no checkpoint in {run_dir}")
    return found[-1]


def run_cli(args: list[str]) -> None:
    from mobillama.cli import main

    print("$ mobillama " + " ".join(args), flush=True)
    if main(args) != 0:
        raise SystemExit(f"mobillama {args[0]} failed")


def pretrain_base(work: Path, steps: int) -> Path:
    lib = Path(sysconfig.get_paths()["stdlib"])
    sources = [str(lib / "*.py")]  # the top-level stdlib modules (~5 MB of code and docstrings)
    if not (work / "tok").is_dir():
        run_cli(
            [
                "tokenizer",
                "train",
                "--input",
                *sources,
                "--vocab-size",
                "2048",
                "--quiet",
                "--out",
                str(work / "tok"),
            ]
        )
    if not (work / "data").is_dir():
        run_cli(
            ["data", "prepare", "--input", *sources, "--tokenizer", str(work / "tok"), "--seq-len", "128"]
            + ["--quiet", "--out", str(work / "data")]
        )
    pre = work / "pretrain"
    if not (pre / "checkpoints").is_dir():
        run_cli(
            ["pretrain", "--recipe", "tiny-cpu", "--out", str(pre), f"--data.path={work / 'data'}"]
            + ["--batch.global_batch_tokens=1024", f"--train.max_steps={steps}", "--optim.warmup_steps=20"]
            + [f"--checkpoint.every_steps={steps}", f"--eval.every_steps={steps}", "--log.tensorboard=false"]
        )
    return newest_checkpoint(pre)


# The training answers' shape: a back-quoted call signature, a colon, a summary (sft/instructions.py).
ANSWER_FORMAT = re.compile(r"^`[^`\n]+`: \S")


def format_counts(answers_: list[dict]) -> dict[str, int]:
    """How many answers end on EOS, take the training format, and both (the SFT claim, over all prompts)."""
    ends = [a["ended_with_eos"] for a in answers_]
    shaped = [bool(ANSWER_FORMAT.match(a["answer"].strip())) for a in answers_]
    return {
        "prompts": len(answers_),
        "ended_with_eos": sum(ends),
        "assistant_format": sum(shaped),
        "both": sum(e and f for e, f in zip(ends, shaped)),
    }


def answers(checkpoint: Path, prompts: list[str], max_new_tokens: int) -> list[dict]:
    from mobillama.infer.generator import Generator
    from mobillama.infer.load import load_for_inference
    from mobillama.infer.sampling import SamplingParams
    from mobillama.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    generator = Generator(load_for_inference(checkpoint, dtype="fp32"), tokenizer)
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    out = []
    for prompt, completion in zip(prompts, generator.generate(rendered, params)):
        out.append(
            {
                "prompt": prompt,
                "answer": completion.text,
                "ended_with_eos": completion.finish_reason == "stop",
            }
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/sft-demo", help="working directory (reused if present)")
    parser.add_argument("--base", default=None, help="fine-tune this checkpoint instead of pre-training one")
    parser.add_argument("--pretrain-steps", type=int, default=400, help="pre-training steps of the tiny base")
    parser.add_argument("--epochs", type=float, default=3.0, help="SFT epochs (train.epochs)")
    parser.add_argument(
        "--prompts", type=int, default=0, help="held-out prompts to answer (default 0: all of them)"
    )
    parser.add_argument("--show", type=int, default=6, help="answers to print (the JSON keeps them all)")
    args = parser.parse_args()

    from mobillama.sft.train import assistant_token_loss

    torch.set_num_threads(1)  # tiny matmuls on a shared machine
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = Path(args.base) if args.base else pretrain_base(work, args.pretrain_steps)
    data = work / "sft-data"
    run_cli(["sft", "build-data", "--out", str(data)])
    heldout = data / "heldout.jsonl"
    before = assistant_token_loss(base, heldout, max_length=256)
    sft_run = work / "sft"
    run_cli(
        ["sft", "--recipe", "sft-tiny-cpu", "--base", str(base), "--out", str(sft_run), "--resume", "auto"]
        + [f"--data.train={data / 'train.jsonl'}", f"--data.val={heldout}", f"--train.epochs={args.epochs}"]
        + ["--log.tensorboard=false"]
    )
    tuned = newest_checkpoint(sft_run)
    after = assistant_token_loss(tuned, heldout, max_length=256)
    prompts = [
        json.loads(line)["messages"][0]["content"]
        for line in heldout.read_text(encoding="utf-8").splitlines()[: args.prompts or None]
    ]
    answers_before, answers_after = answers(base, prompts, 60), answers(tuned, prompts, 60)
    results = {
        "base": str(base),
        "fine_tuned": str(tuned),
        "heldout_assistant_loss_before": before,
        "heldout_assistant_loss_after": after,
        "format_before": format_counts(answers_before),
        "format_after": format_counts(answers_after),
        "answers_before": answers_before,
        "answers_after": answers_after,
        "seconds": time.perf_counter() - t0,
    }
    (work / "sft_demo.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"\n{'model':<12} {'held-out assistant-token loss':>30} {'ppl':>8}")
    for name, r in (("base", before), ("fine-tuned", after)):
        print(f"{name:<12} {r['loss']:>30.4f} {torch.tensor(r['loss']).exp().item():>8.1f}")
    print(
        f"ratio after/before: {after['loss'] / before['loss']:.3f} ({before['tokens']} tokens, "
        f"{before['conversations']} held-out conversations)"
    )
    for name, key in (("base", "format_before"), ("fine-tuned", "format_after")):
        c = results[key]
        print(
            f"{name}: of {c['prompts']} held-out prompts, {c['ended_with_eos']} answers end on EOS, "
            f"{c['assistant_format']} take the assistant format, {c['both']} both"
        )
    for b, a in list(zip(answers_before, answers_after))[: args.show]:
        print(
            f"\nQ: {a['prompt']}\n  base: {b['answer']!r} (eos: {b['ended_with_eos']})"
            f"\n  sft:  {a['answer']!r} (eos: {a['ended_with_eos']})"
        )
    print(f"\nwrote {work / 'sft_demo.json'} in {results['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
