"""Training throughput: this engine's train step against a plain loop over transformers.LlamaForCausalLM.

Same shape (a ~20M-parameter Llama at seq 256: 8 layers, hidden 384, FFN 1024, 6 heads, vocab 8192),
same batch (8 x 256 tokens per step), same precision (fp32, or bf16 autocast with fp32 weights and loss:
``--precision``), same optimizer settings (AdamW 0.9/0.95, wd 0.1, clip 1.0). Variants:

    hf-llama          plain loop: model(input_ids) -> fp32 cross-entropy -> backward -> clip -> AdamW
                      (torch.optim.AdamW as a user writes it, i.e. PyTorch's default implementation)
    hf-llama-compiled the same model tuned as the engine is: each decoder layer torch.compile'd in place,
                      the cross-entropy compiled, fused AdamW (the strongest transformers peer here)
    engine            mobillama Trainer.train_step, ffn_sharing none (the identical model)
    engine-compiled   the same with recipe key model.compile (each layer and the cross-entropy compiled)
    engine-shared     the MobiLlama variant (one shared FFN: same compute, fewer parameters)

Ratios are quoted against the faster of the two transformers loops in the same run ("vs best hf"); the
ratio to the eager loop is a second column. MFU is reported against a peak measured in the same run (a large matmul in the run's precision on this
machine), since a shared VM has no reliable spec-sheet peak. Usage::

    python benchmarks/train_throughput.py [--steps 5] [--warmup 2] [--batch 8] [--threads 2] [--precision bf16]

Throughput comes from one process that runs one step of each variant in turn (so load changes on a
shared machine hit all variants alike; medians reported); peak RSS from a fresh process per variant.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(
    vocab_size=8192,
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=6,
    num_key_value_heads=6,
    max_position_embeddings=256,
)
SEQ, BATCH = 256, 8
PRECISION = "fp32"  # or "bf16": autocast to bfloat16 with fp32 master weights and fp32 loss, in every variant
VARIANTS = ["hf-llama", "hf-llama-compiled", "engine", "engine-compiled", "engine-shared"]
HF_VARIANTS = ("hf-llama", "hf-llama-compiled")


def _batches(steps: int):
    import torch

    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(3, SHAPE["vocab_size"], (BATCH, SEQ + 1), generator=g)
        yield {"input_ids": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()}


def peak_matmul_flops(seconds: float = 3.0) -> float:
    """Achieved GEMM FLOP/s (2048^3) in the run's precision: the practical peak of this machine right now."""
    import torch

    dtype = torch.bfloat16 if PRECISION == "bf16" else torch.float32
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return n * 2 * 2048**3 / (time.perf_counter() - t0)


def build_step(name: str, total_steps: int):
    """(step function taking a batch, parameter count) for one variant."""
    import torch

    torch.manual_seed(0)
    if name in HF_VARIANTS:
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        cfg = LlamaConfig(**SHAPE, rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="sdpa")
        model = LlamaForCausalLM(cfg).train()
        compiled = name == "hf-llama-compiled"
        opt = torch.optim.AdamW(
            model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=compiled or None
        )

        def cross_entropy(logits, labels):
            return torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1)
            )

        if compiled:  # the engine's model.compile, applied to transformers' own layers
            for module in model.modules():
                if isinstance(module, LlamaDecoderLayer):
                    module.compile()
            cross_entropy = torch.compile(cross_entropy)

        def step(batch):
            # the same targets as the engine (labels already shifted), loss in fp32
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=PRECISION == "bf16"):
                logits = model(input_ids=batch["input_ids"]).logits
            loss = cross_entropy(logits, batch["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        params = sum(p.numel() for p in model.parameters())
    else:
        from mobillama.config import ModelConfig
        from mobillama.model import MobiLlama
        from mobillama.train.distributed import DistContext
        from mobillama.train.loop import Trainer, compile_for_training, lm_loss_sum
        from mobillama.train.recipe import recipe_from_dict

        sharing = "all" if name == "engine-shared" else "none"
        config = ModelConfig(**SHAPE, ffn_sharing=sharing)
        model = MobiLlama(config)
        loss_fn = lm_loss_sum
        if name == "engine-compiled":  # what recipe key model.compile does: layers and cross-entropy
            loss_fn = functools.partial(lm_loss_sum, cross_entropy=compile_for_training(model))
        recipe = recipe_from_dict(
            {
                "model": {"preset": "tiny"},
                "optim": {"warmup_steps": 0},
                "train": {"max_steps": total_steps, "precision": PRECISION},
            }
        )

        class Source:  # the trainer pulls this step's micro-batches from here
            batch = None

            def next_step(self):
                return [self.batch]

        source = Source()
        trainer = Trainer(
            model,
            recipe,
            source,
            ctx=DistContext(),
            run_dir="/tmp/unused",
            loss_fn=loss_fn,
            say=lambda _m: None,
        )

        def step(batch):
            source.batch = batch
            trainer.train_step()

        params = model.num_parameters()
    return step, params


def peak_rss(name: str, warmup: int) -> float:
    """Peak RSS (MB) of a fresh process that builds the variant and runs ``warmup + 1`` steps."""
    step, _ = build_step(name, warmup + 1)
    for batch in _batches(warmup + 1):
        step(batch)
    # VmHWM, not getrusage: Linux carries ru_maxrss across fork+exec, so a child of this (large) parent
    # would report the parent's peak.
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    global BATCH, PRECISION
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=5, help="measured rounds (one step of every variant each)"
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="unmeasured steps first (compilation, allocator)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every variant")
    parser.add_argument("--batch", type=int, default=BATCH, help="samples of 256 tokens per step")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=PRECISION,
        help="fp32, or bf16 autocast (fp32 master weights and loss) in every variant",
    )
    parser.add_argument("--no-rss", action="store_true", help="skip the per-variant peak-RSS processes")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    BATCH, PRECISION = args.batch, args.precision
    torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps({"peak_rss_mb": peak_rss(args.variant, args.warmup)}))
        return
    from mobillama.config import ModelConfig
    from mobillama.model import flops_per_token

    # Throughput: all variants in this process, one step of each in turn per round, so load changes on a
    # shared machine hit every variant alike; the median step time per variant is reported.
    rounds = args.warmup + args.steps
    steps = {v: build_step(v, rounds) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    peak = peak_matmul_flops()
    for r, batch in enumerate(_batches(rounds)):
        for v in VARIANTS:
            t0 = time.perf_counter()
            steps[v][0](batch)
            if r >= args.warmup:
                times[v].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{rounds}", file=sys.stderr)
    peak = max(peak, peak_matmul_flops())
    rss = {}
    if not args.no_rss:
        for v in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", v, "--warmup", "1", "--threads", str(args.threads)]
            cmd += ["--precision", PRECISION, "--batch", str(BATCH)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=True).stdout
            rss[v] = json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]
    fpt = flops_per_token(ModelConfig(**SHAPE, ffn_sharing="none"), SEQ)
    tps = {v: BATCH * SEQ / statistics.median(t) for v, t in times.items()}
    best_hf = max(HF_VARIANTS, key=lambda v: tps[v])  # the strongest peer of this run
    print(
        f"shape {SHAPE}, batch {BATCH}x{SEQ}, {PRECISION}, {args.steps} measured rounds, {args.threads} threads"
    )
    print(f"measured {PRECISION} GEMM peak: {peak / 1e9:.1f} GFLOP/s; training FLOPs/token {fpt / 1e6:.1f} M")
    print(f"ratios against the faster transformers loop of this run: {best_hf}")
    print(
        f"{'variant':<18} {'params':>11} {'tokens/s':>10} {'vs best hf':>10} {'per round':>13} "
        f"{'vs hf eager':>11} {'MFU':>7} {'peak RSS MB':>12}"
    )
    for v in VARIANTS:
        mem = f"{rss[v]:>12.0f}" if v in rss else f"{'-':>12}"
        # the ratio within each round (both steps under the same load), lowest and highest
        ratios = [hf / t for hf, t in zip(times[best_hf], times[v])]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}x"
        print(
            f"{v:<18} {steps[v][1]:>11,} {tps[v]:>10.0f} {tps[v] / tps[best_hf]:>9.2f}x {spread:>13} "
            f"{tps[v] / tps['hf-llama']:>10.2f}x {tps[v] * fpt / peak:>6.1%} {mem}"
        )


if __name__ == "__main__":
    main()
