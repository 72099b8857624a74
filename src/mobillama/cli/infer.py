"""Inference commands: ``generate``, ``chat``, ``bench`` and ``quantize``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="compute dtype (default bf16)")
    p.add_argument(
        "--bits",
        type=int,
        choices=[8, 4],
        help="quantize the weights on the fly to int8 (per channel) or int4 (per group); "
        "a quantized checkpoint is used as stored",
    )
    p.add_argument(
        "--group-size",
        type=int,
        help="int4 group size (32, 64, 128 or 256; default 32, llama.cpp's Q4 block: larger groups are faster "
        "but less accurate on real weights)",
    )
    p.add_argument(
        "--head-bits",
        type=int,
        choices=[8, 4],
        help="with --bits: quantize the LM head (a tied one too) to these bits; 8 under --bits 4 is llama.cpp's "
        "layout (default: an untied head at --bits, a tied one kept in float)",
    )
    p.add_argument(
        "--int8-kernel",
        default="auto",
        choices=["auto", "vnni", "dynamic", "weight_only", "reference"],
        help="int8 matmul kernel on CPU: the project's kernel (int8 activations, one scale per block of 32; its "
        "AVX-512 VNNI build, or its AVX2 build on CPUs without AVX-512, same results; auto picks it where either "
        "runs, else weight-only), weight-only int8 with bf16 activations, "
        "fbgemm dynamic int8 (one activation scale per call: fast, but ~3x perplexity on a real model "
        "over long prompts), or the dequantizing reference",
    )
    p.add_argument(
        "--int4-kernel",
        default="auto",
        choices=["auto", "vnni", "stock", "reference"],
        help="int4 matmul kernel on CPU: the project's kernel (int8 activations, one scale per block of 32; its "
        "AVX-512 VNNI build, or its AVX2 build on CPUs without AVX-512; auto picks it where either runs), "
        "PyTorch's stock int4 kernel (bf16 activations), or the "
        "dequantizing reference",
    )
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow to start)")


def _add_sampling_options(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument(
        "--temperature",
        type=float,
        default=temperature,
        help=f"sampling temperature; 0 = greedy (default {temperature})",
    )
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="penalty > 1 discourages repeats (1 = off)"
    )
    p.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    p.add_argument("--seed", type=int, help="random seed for sampling (reproducible output)")


def register(subparsers: argparse._SubParsersAction) -> None:
    g = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint",
        description="Complete one or more prompts (several are batched with left padding) with the fast "
        "static-cache decoder. Greedy by default; sampling with --temperature/--top-k/--top-p.",
    )
    g.add_argument(
        "checkpoint", metavar="CKPT", help="checkpoint directory (plain or quantized) with tokenizer files"
    )
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt only)")
    g.add_argument(
        "--json", action="store_true", help="print completions as JSON (text, finish reason, token counts)"
    )
    _add_sampling_options(g, temperature=0.0)
    _add_model_options(g)
    g.add_argument(
        "--lean",
        action="store_true",
        help="decode on the lean runtime (no PyTorch in the process: see 'bench --lean'): one prompt, a "
        "quantized checkpoint as stored, a CPU with AVX-512 VNNI or AVX2; greedy, or sampled with the options "
        "above (a --seed reproduces a lean run, not the default runtime's draw)",
    )
    g.set_defaults(func=run_generate)

    c = subparsers.add_parser(
        "chat",
        help="interactive chat with a checkpoint",
        description="Chat in the terminal with history. The prompt uses the checkpoint's own chat template "
        "(ChatML for SmolLM2, ...; MobiLlama-Chat's '### Human: / ### Assistant:' format for a tokenizer "
        "without one), with BOS only where the tokenizer adds it, and the reply ends at the tokenizer's "
        "end-of-turn/EOS tokens. Commands: /reset, /exit. "
        "When the conversation outgrows the context the oldest turns are dropped (with a notice). "
        "A MobiLlama-V checkpoint (with vision_config.json) chats about --image (command /image PATH "
        "switches it); its replies stream as text replies do.",
    )
    c.add_argument(
        "checkpoint", metavar="CKPT", help="checkpoint directory (plain or quantized) with tokenizer files"
    )
    c.add_argument(
        "--system",
        help="system message (default: the chat template's own, e.g. MobiLlama-Chat's system line)",
    )
    c.add_argument(
        "--image",
        metavar="PATH",
        help="image to talk about (needs a MobiLlama-V checkpoint; attached to the first user turn)",
    )
    _add_sampling_options(c, temperature=0.7)
    _add_model_options(c)
    c.set_defaults(func=run_chat)

    b = subparsers.add_parser(
        "bench",
        help="measure prefill/decode speed, memory and bandwidth",
        description="Time a prefill and greedy decode on a preset (random weights: speed does not depend "
        "on them) or a checkpoint. Reports prefill and decode tokens/s, time to first token, peak RSS, "
        "model bytes, and the achieved memory bandwidth against a measured read-bandwidth roofline; with "
        "--perplexity-text, the perplexity of the same model on a text file, so the quality cost of "
        "--bits/--group-size/kernel choices shows next to their speed.",
    )
    b.add_argument(
        "model",
        metavar="CKPT_OR_PRESET",
        help="a checkpoint directory or a preset name (e.g. mobillama-0.5b)",
    )
    b.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    b.add_argument("--new-tokens", type=int, default=128, help="tokens to decode (default 128)")
    b.add_argument("--batch", type=int, default=1, help="prompts decoded together (default 1)")
    b.add_argument(
        "--duplicate-ffn",
        action="store_true",
        help="give every layer its own FFN copy (the unshared control)",
    )
    b.add_argument("--no-roofline", action="store_true", help="skip the memory-bandwidth measurement")
    b.add_argument(
        "--perplexity-text",
        metavar="FILE",
        help="also score this UTF-8 text file with the same model (same --bits/--group-size/kernels) and "
        "print its perplexity next to the speed, scored as llama.cpp's llama-perplexity does (windows, "
        "second half of each scored, BOS by the tokenizer's rule); needs a checkpoint with its tokenizer",
    )
    b.add_argument(
        "--perplexity-windows",
        type=int,
        default=8,
        metavar="N",
        help="score at most N windows of the text (default 8)",
    )
    b.add_argument(
        "--perplexity-ctx",
        type=int,
        default=512,
        metavar="TOKENS",
        help="window length in tokens (default 512, as the llama.cpp comparisons use)",
    )
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.add_argument(
        "--lean",
        action="store_true",
        help="run on the lean runtime: the same C kernels in a process that never imports PyTorch "
        "(~0.2 GB less resident memory). Takes a quantized checkpoint as stored (from 'mobillama "
        "quantize'), batch 1, on a CPU with AVX-512 VNNI or AVX2; its first use writes the checkpoint's kernel "
        "image (once, cached under ~/.cache/mobillama/lean)",
    )
    _add_model_options(b)
    b.set_defaults(func=run_bench)

    q = subparsers.add_parser(
        "quantize",
        help="write a weight-only int8/int4 quantized checkpoint",
        description="Quantize a checkpoint's Linear layers (attention, the FFN(s), LM head) to int8 per "
        "output channel or int4 per group and write a checkpoint directory: safetensors with packed "
        "weights and scales (a shared FFN stored once) plus quantization.json. An untied LM head is "
        "quantized (--keep-head keeps it in float); a head tied to the embedding stays in float unless "
        "--quantize-head (then it is quantized once and serves the embedding lookups too). 'mobillama "
        "generate', 'chat', 'bench' and 'eval' load it directly.",
    )
    q.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory to quantize")
    q.add_argument("--bits", type=int, choices=[8, 4], required=True, help="8 (per channel) or 4 (per group)")
    q.add_argument(
        "--group-size",
        type=int,
        help="int4 group size: 32, 64, 128 or 256 (default 32, llama.cpp's Q4 block: larger groups are "
        "faster but less accurate on real weights)",
    )
    q.add_argument("--out", required=True, help="output checkpoint directory")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    head = q.add_mutually_exclusive_group()
    head.add_argument(
        "--keep-head",
        action="store_true",
        help="keep the LM head in float (the default for a head tied to the embedding)",
    )
    head.add_argument(
        "--quantize-head",
        action="store_true",
        help="quantize the LM head, tied or not; a tied one is stored once and serves the embedding too. "
        "Fewer bytes per token, lower quality: +5.6%% perplexity at int4 g32 and +0.15%% at int8 on "
        "SmolLM2-135M; see --head-bits 8 for int4 (default: only an untied head is quantized)",
    )
    q.add_argument(
        "--head-bits",
        type=int,
        choices=[8, 4],
        help="bits of a quantized LM head (default: --bits). 8 under --bits 4 is what llama.cpp does in its "
        "4-bit files: half a bf16 head's bytes per token for almost no quality; implies --quantize-head",
    )
    q.add_argument(
        "--int4-params",
        choices=["auto", "codes", "half"],
        help="how int4 scales and offsets are stored for the kernel: 'codes' = 8-bit codes times a bf16 step "
        "per 256 columns (groups of 32/64; 4.625 bits a weight at group 32, 7.5%% fewer bytes a token than "
        "half floats), 'half' = half floats (5 bits at group 32, llama.cpp's Q4_1 grid), 'auto' (default) = "
        "codes, except layers already on a half-float grid (a model imported from a Q4_1 GGUF) stay exact",
    )
    q.add_argument(
        "--int8-group-size",
        type=int,
        choices=[32, 64, 128, 256],
        help="int8 layers (--bits 8, or --head-bits 8) with one scale per group of this many input columns "
        "instead of one per output channel: 32 is llama.cpp's Q8_0 grid (1 more byte per 32 weights in the "
        "kernel; on a CPU with neither AVX-512 VNNI nor AVX2 such layers dequantize on every call)",
    )
    q.set_defaults(func=run_quantize)


def _threads_and_sampling(args: argparse.Namespace):
    """Apply ``--threads`` and build the sampling parameters shared by generate and both chats (a vision
    checkpoint has refused ``--repetition-penalty`` before this, so its value is the neutral 1.0)."""
    import torch

    from mobillama.errors import MobiLlamaError
    from mobillama.infer.sampling import SamplingParams

    if args.threads is not None:
        if args.threads < 1:
            raise MobiLlamaError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop),
        seed=args.seed,
    )


def _setup(args: argparse.Namespace):
    from mobillama.errors import MobiLlamaError
    from mobillama.infer.generator import Generator
    from mobillama.infer.load import load_checkpoint_tokenizer, load_for_inference

    params = _threads_and_sampling(args)
    if not Path(args.checkpoint).is_dir():
        raise MobiLlamaError(f"checkpoint not found: {args.checkpoint}")
    tokenizer = load_checkpoint_tokenizer(args.checkpoint)
    model = load_for_inference(
        args.checkpoint,
        dtype=args.dtype,
        bits=args.bits,
        group_size=args.group_size,
        head_bits=args.head_bits,
        int8_kernel=args.int8_kernel,
        int4_kernel=args.int4_kernel,
    )
    return Generator(model, tokenizer, compile=args.compile), params


def run_generate(args: argparse.Namespace) -> int:
    from mobillama.errors import MobiLlamaError

    if args.stream and len(args.prompt) > 1:
        raise MobiLlamaError("--stream takes one --prompt")
    if args.lean:
        return run_lean_generate(args)
    generator, params = _setup(args)

    def stream(_row: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    completions = generator.generate(args.prompt, params, on_text=stream if args.stream else None)
    if args.json:
        print(json.dumps([c.__dict__ for c in completions], indent=2))
    elif args.stream:
        print()
    else:
        for i, c in enumerate(completions):
            if len(completions) > 1:
                print(f"--- [{i}] finish={c.finish_reason} tokens={c.completion_tokens}")
            print(c.text)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from mobillama.errors import MobiLlamaError
    from mobillama.infer.chat import chat_loop
    from mobillama.infer.load import describe_checkpoint

    if not Path(args.checkpoint).is_dir():
        raise MobiLlamaError(f"checkpoint not found: {args.checkpoint}")
    if describe_checkpoint(args.checkpoint, presets=False).is_vision:
        return _run_vision_chat(args)
    if args.image is not None:
        raise MobiLlamaError(
            f"--image needs a MobiLlama-V checkpoint (a directory with vision_config.json); "
            f"{args.checkpoint} is a text-only model"
        )
    generator, params = _setup(args)
    chat_loop(generator, params, sys.stdin, sys.stdout, system=args.system)
    return 0


def _run_vision_chat(args: argparse.Namespace) -> int:
    """``chat`` on a MobiLlama-V checkpoint: the image is read before the (slower) model load."""
    from mobillama.errors import MobiLlamaError
    from mobillama.infer.chat import vision_chat_loop
    from mobillama.vision.chat import load_vision_chat
    from mobillama.vision.data import read_image_file

    unsupported = [
        name
        for name, used in (
            ("--bits", args.bits is not None),
            ("--group-size", args.group_size is not None),
            ("--head-bits", args.head_bits is not None),
            ("--compile", args.compile),
            ("--repetition-penalty", args.repetition_penalty != 1.0),
        )
        if used
    ]
    if unsupported:
        raise MobiLlamaError(f"{', '.join(unsupported)}: not supported for a MobiLlama-V checkpoint")
    params = _threads_and_sampling(args)
    image = read_image_file(args.image) if args.image is not None else None
    model, tokenizer, processor = load_vision_chat(args.checkpoint, dtype=args.dtype)
    vision_chat_loop(
        model, tokenizer, processor, params, sys.stdin, sys.stdout, image=image, system=args.system
    )
    return 0


# bench options the lean runtime does not take, with their defaults
_NOT_LEAN = {
    "bits": None, "head_bits": None, "group_size": None, "int8_kernel": "auto", "int4_kernel": "auto",
    "dtype": "bf16", "batch": 1, "compile": False, "duplicate_ffn": False, "perplexity_text": None,
}  # fmt: skip


def run_bench(args: argparse.Namespace) -> int:
    if args.lean:
        return run_lean_bench(args)
    from mobillama.infer.bench import format_bench, run_bench

    result = run_bench(
        args.model,
        dtype=args.dtype,
        bits=args.bits,
        group_size=args.group_size,
        head_bits=args.head_bits,
        int8_kernel=args.int8_kernel,
        int4_kernel=args.int4_kernel,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        threads=args.threads,
        batch=args.batch,
        compile=args.compile,
        duplicate=args.duplicate_ffn,
        measure_bandwidth=not args.no_roofline,
        perplexity_text=args.perplexity_text,
        perplexity_windows=args.perplexity_windows,
        perplexity_ctx=args.perplexity_ctx,
    )
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def _refuse_for_lean(args: argparse.Namespace, options: dict, what: str) -> None:
    from mobillama.errors import MobiLlamaError

    given = [k for k, default in options.items() if getattr(args, k, default) != default]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise MobiLlamaError(f"--lean {what}: drop {flags}")


def run_lean_generate(args: argparse.Namespace) -> int:
    """``generate --lean``: one prompt, greedy or sampled; nothing here imports torch."""
    from mobillama.errors import MobiLlamaError
    from mobillama.infer.lean import LeanModel, lean_generate
    from mobillama.infer.sampling import SamplingParams
    from mobillama.tokenizer import load_tokenizer

    _refuse_for_lean(args, _NOT_LEAN, "runs a quantized checkpoint as stored")
    if len(args.prompt) > 1:
        raise MobiLlamaError("--lean takes one --prompt")
    params = SamplingParams(  # checked before the model is opened (its first use writes the kernel image)
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop=tuple(args.stop), seed=args.seed,
    )  # fmt: skip
    model = LeanModel.open(args.checkpoint, args.threads)
    tokenizer = load_tokenizer(args.checkpoint)

    def stream(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = lean_generate(model, tokenizer, args.prompt[0], params, on_text=stream if args.stream else None)
    if args.json:
        print(json.dumps([result], indent=2))
    elif args.stream:
        print()
    else:
        print(result["text"])
    return 0


def run_lean_bench(args: argparse.Namespace) -> int:
    """``bench --lean``: nothing here may import torch (the point is a process without it)."""
    from mobillama.infer.lean import format_lean_bench, lean_bench

    _refuse_for_lean(args, _NOT_LEAN, "runs a quantized checkpoint as stored, at batch 1")
    result = lean_bench(
        args.model, prompt_len=args.prompt_len, new_tokens=args.new_tokens, threads=args.threads
    )
    print(json.dumps(result, indent=2) if args.json else format_lean_bench(result))
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from mobillama.errors import MobiLlamaError
    from mobillama.infer.quant_checkpoint import quantize_checkpoint

    if args.keep_head and args.head_bits:  # said in the flags' words (the library's check says it too)
        raise MobiLlamaError("--head-bits quantizes the LM head; it cannot go with --keep-head")
    if args.int4_params and args.bits != 4:
        raise MobiLlamaError("--int4-params applies to --bits 4")
    summary = quantize_checkpoint(
        args.checkpoint,
        args.out,
        args.bits,
        args.group_size,
        overwrite=args.overwrite,
        quantize_head=True if args.quantize_head else False if args.keep_head else None,
        head_bits=args.head_bits,
        int4_params=args.int4_params or "auto",
        int8_group_size=args.int8_group_size,
    )
    print(
        f"wrote {summary['out']}: int{summary['bits']}"
        + (f" group {summary['group_size']}" if summary["bits"] == 4 else "")
        + (f", int8 scales per {summary['int8_group_size']} columns" if summary["int8_group_size"] else "")
        + f", {summary['quantized_layers']} quantized layers, "
        f"{summary['bytes_before'] / 1e6:.1f} MB -> {summary['bytes_after'] / 1e6:.1f} MB"
        + (
            f" (LM head int{summary['head_bits']})"
            if summary["quantize_head"] and summary["head_bits"] != summary["bits"]
            else ""
            if summary["quantize_head"]
            else " (LM head kept in float)"
        )
        + _int4_params_note(summary.get("int4_params_layers"))
    )
    return 0


def _int4_params_note(layers: dict[str, int] | None) -> str:
    """What the int4 layers' params became, where some kept half floats (a Q4_1 import, or asked for)."""
    if not layers or not layers["half"]:
        return ""
    if not layers["codes"]:
        return "; int4 scales as half floats"
    return f"; int4 scales: {layers['codes']} layers as 8-bit codes, {layers['half']} as half floats"
