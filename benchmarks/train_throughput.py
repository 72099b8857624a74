"""Training throughput: this engine's train step against a plain loop over transformers.LlamaForCausalLM.

Same shape (a ~20M-parameter Llama at seq 256: 8 layers, hidden 384, FFN 1024, 6 heads, vocab 8192),
same batch (8 x 256 tokens per step), same dtype (fp32), same optimizer (AdamW 0.9/0.95, wd 0.1, clip 1.0).
Variants, each in its own process so peak RSS is its own:

    hf-llama          plain loop: model(input_ids, labels=...) -> loss.backward() -> clip -> AdamW step
    engine            mobillama Trainer.train_step, ffn_sharing none (the identical model)
    engine-compiled   the same with model.compile (recipe key model.compile: each layer torch.compile'd)
    engine-shared     the MobiLlama variant (one shared FFN: same compute, fewer parameters)

MFU is reported against a peak measured in the same run (a large fp32 matmul on this machine), since a
shared VM has no reliable spec-sheet peak. Usage::

    python benchmarks/train_throughput.py [--steps 8] [--warmup 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

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
VARIANTS = ["hf-llama", "engine", "engine-compiled", "engine-shared"]


def _batches(steps: int):
    import torch

    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(3, SHAPE["vocab_size"], (BATCH, SEQ + 1), generator=g)
        yield {"input_ids": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()}


def peak_matmul_flops(seconds: float = 3.0) -> float:
    """Achieved fp32 GEMM FLOP/s (2048^3): the practical peak of this machine right now."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return n * 2 * 2048**3 / (time.perf_counter() - t0)


def run_variant(name: str, steps: int, warmup: int) -> dict:
    import torch

    torch.manual_seed(0)
    data = list(_batches(steps + warmup))
    if name == "hf-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**SHAPE, rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="sdpa")
        model = LlamaForCausalLM(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

        def step(batch):
            # HF shifts labels itself: pass the full row so both see the same 256 targets per sample.
            ids = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
            loss = model(input_ids=ids[:, :-1], labels=None).logits
            loss = torch.nn.functional.cross_entropy(
                loss.float().reshape(-1, loss.shape[-1]), batch["labels"].reshape(-1)
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        params = sum(p.numel() for p in model.parameters())
    else:
        from mobillama.config import ModelConfig
        from mobillama.model import MobiLlama
        from mobillama.train.distributed import DistContext
        from mobillama.train.loop import Trainer
        from mobillama.train.recipe import recipe_from_dict

        sharing = "all" if name == "engine-shared" else "none"
        config = ModelConfig(**SHAPE, ffn_sharing=sharing)
        model = MobiLlama(config)
        if name == "engine-compiled":
            for layer in model.model.layers:
                layer.compile()
        recipe = recipe_from_dict(
            {
                "model": {"preset": "tiny"},
                "optim": {"warmup_steps": 0},
                "train": {"max_steps": steps + warmup},
            }
        )
        it = iter(data)

        class Source:
            def next_step(self):
                return [next(it)]

        trainer = Trainer(model, recipe, Source(), ctx=DistContext(), run_dir="/tmp/unused")

        def step(_batch):
            trainer.train_step()

        params = model.num_parameters()
    for batch in data[:warmup]:
        step(batch)
    t0 = time.perf_counter()
    for batch in data[warmup:]:
        step(batch)
    elapsed = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "variant": name,
        "params": params,
        "tokens_per_s": steps * BATCH * SEQ / elapsed,
        "peak_rss_mb": rss_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps per variant")
    parser.add_argument(
        "--warmup", type=int, default=2, help="unmeasured steps first (compilation, allocator)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every variant")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.warmup)))
        return
    from mobillama.config import ModelConfig
    from mobillama.model import flops_per_token

    peak = peak_matmul_flops()
    fpt = flops_per_token(ModelConfig(**SHAPE, ffn_sharing="none"), SEQ)
    rows = []
    for variant in VARIANTS:
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  measured {variant}", file=sys.stderr)
    base = rows[0]["tokens_per_s"]
    print(f"shape {SHAPE}, batch {BATCH}x{SEQ}, fp32, {args.steps} steps, {args.threads} threads")
    print(f"measured fp32 GEMM peak: {peak / 1e9:.1f} GFLOP/s; training FLOPs/token {fpt / 1e6:.1f} M")
    print(f"{'variant':<16} {'params':>11} {'tokens/s':>10} {'vs hf':>7} {'MFU':>7} {'peak RSS MB':>12}")
    for r in rows:
        mfu = r["tokens_per_s"] * fpt / peak
        print(
            f"{r['variant']:<16} {r['params']:>11,} {r['tokens_per_s']:>10.0f} {r['tokens_per_s'] / base:>6.2f}x "
            f"{mfu:>6.1%} {r['peak_rss_mb']:>12.0f}"
        )


if __name__ == "__main__":
    main()
