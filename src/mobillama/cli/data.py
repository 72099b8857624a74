"""Data commands: ``tokenizer train``, ``data prepare``, ``data inspect``, ``data verify``."""

from __future__ import annotations

import argparse
import json
import time

SOURCE_HELP = (
    "a named corpus: 'stdlib' (the Python standard library's code and pydoc topics, always available) "
    "or 'english[:DIR]' (Debian docs, Shakespeare, KJV fetched by scripts/fetch_english_corpus.sh)"
)
INPUT_HELP = (
    "text files, directories, glob patterns (quote them), .gz/.bz2/.xz, JSONL (*.jsonl), Parquet, or "
    "directories written by datasets.save_to_disk"
)


def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", default=[], metavar="PATH", help=INPUT_HELP)
    p.add_argument("--source", metavar="NAME", help=SOURCE_HELP)
    p.add_argument(
        "--text-field",
        default="text",
        help="the JSONL key / Parquet or dataset column holding the text (default: text)",
    )
    p.add_argument(
        "--split", default="train", help="which split of a saved DatasetDict to read (default: train)"
    )
    p.add_argument(
        "--max-doc-mb",
        type=float,
        default=16.0,
        help="skip (and count) documents larger than this many MB (default: 16)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop with an error at the first unusable document instead of counting it",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists (it is swapped only on success)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers: argparse._SubParsersAction) -> None:
    tok = subparsers.add_parser(
        "tokenizer",
        help="train a byte-fallback BPE tokenizer",
        description="Tokenizer commands. 'train' learns a byte-fallback BPE (HF tokenizers) with Llama "
        "conventions: <unk>=0, <s>=1, </s>=2, then the 256 byte pieces.",
    )
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    train = tok_sub.add_parser(
        "train",
        help="train a tokenizer on text files or a named corpus",
        description="Train a byte-fallback BPE tokenizer and write an HF tokenizer directory (tokenizer.json, "
        "tokenizer_config.json with the MobiLlama-Chat template) loadable by AutoTokenizer.",
    )
    _add_source_options(train)
    train.add_argument(
        "--vocab-size",
        type=int,
        default=32000,
        help="vocabulary size including special and byte tokens (default: 32000)",
    )
    train.add_argument(
        "--min-frequency", type=int, default=2, help="ignore merges seen fewer times than this (default: 2)"
    )
    train.add_argument(
        "--out", required=True, metavar="DIR", help="output tokenizer directory (written atomically)"
    )
    train.set_defaults(func=run_tokenizer_train)

    data = subparsers.add_parser(
        "data",
        help="prepare and inspect token shards",
        description="Turn text into packed token shards with a manifest (prepare), check or summarise them.",
    )
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    prep = data_sub.add_parser(
        "prepare",
        help="tokenize text into packed, shuffled, hashed token shards",
        description="Tokenize documents (<s> text </s>), split them into train/val by document, shuffle with "
        "a seed, pack into rows of seq_len+1 tokens and write uint16/uint32 shards plus manifest.json. "
        "The same inputs, tokenizer and seed give byte-identical output for any --workers.",
    )
    _add_source_options(prep)
    prep.add_argument(
        "--tokenizer",
        required=True,
        metavar="PATH",
        help="tokenizer directory, tokenizer.json or SentencePiece tokenizer.model",
    )
    prep.add_argument(
        "--out", required=True, metavar="DIR", help="output shard directory (written atomically)"
    )
    prep.add_argument(
        "--seq-len",
        type=int,
        default=2048,
        help="tokens per training sequence; rows hold seq_len+1 (default: 2048)",
    )
    prep.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        help="fraction of documents held out for validation; 0 disables (default: 0.01)",
    )
    prep.add_argument("--chunks", type=int, default=1, help="number of train shard files (default: 1)")
    prep.add_argument(
        "--workers", type=int, default=None, help="tokenizer processes (default: CPU count, at most 4)"
    )
    prep.add_argument(
        "--seed", type=int, default=0, help="seed of the document shuffle and the split (default: 0)"
    )
    prep.set_defaults(func=run_prepare)

    insp = data_sub.add_parser(
        "inspect",
        help="summarise a shard directory and decode one sample",
        description="Print the manifest summary, decode the start of one sample and list the source "
        "documents it came from.",
    )
    insp.add_argument("dir", metavar="DIR", help="shard directory written by 'data prepare'")
    insp.add_argument("--split", default="train", help="split to show a sample from (default: train)")
    insp.add_argument("--sample", type=int, default=0, help="row index within the split (default: 0)")
    insp.add_argument(
        "--tokens", type=int, default=64, help="how many tokens of the sample to decode (default: 64)"
    )
    insp.set_defaults(func=run_inspect)

    ver = data_sub.add_parser(
        "verify",
        help="check every shard's size and sha256 against the manifest",
        description="Re-hash every shard and document index; exit 2 with the first mismatch.",
    )
    ver.add_argument("dir", metavar="DIR", help="shard directory written by 'data prepare'")
    ver.set_defaults(func=run_verify)


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from mobillama.data.sources import SkipLog, iter_texts, resolve_sources
    from mobillama.tokenizer import train_tokenizer

    sources = resolve_sources(args.input, source=args.source, text_field=args.text_field, split=args.split)
    skips = SkipLog(strict=args.strict)
    texts = iter_texts(sources, skips, max_doc_bytes=int(args.max_doc_mb * (1 << 20)))
    tok = train_tokenizer(
        texts, args.vocab_size, args.out, min_frequency=args.min_frequency, overwrite=args.overwrite,
        progress=not args.quiet, metadata={"sources": len(sources), "skipped": dict(skips.by_reason)},
    )  # fmt: skip
    print(
        f"wrote {args.out}: vocab {tok.vocab_size}, sha256 {tok.sha256[:16]}…, {len(sources)} source file(s)"
    )
    if skips.total:
        print(f"skipped {skips.total} document(s): {dict(sorted(skips.by_reason.items()))}")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from mobillama.data.prepare import prepare_corpus

    start = time.perf_counter()
    m = prepare_corpus(
        args.input, args.tokenizer, args.out, source=args.source, seq_len=args.seq_len,
        val_fraction=args.val_fraction, chunks=args.chunks, workers=args.workers, text_field=args.text_field,
        split=args.split, seed=args.seed, max_doc_bytes=int(args.max_doc_mb * (1 << 20)), strict=args.strict,
        overwrite=args.overwrite, progress=not args.quiet,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    print(f"wrote {args.out}: {len(m['sources'])} source file(s), {m['documents']['used']} documents, "
          f"{m['tokens']['documents']} tokens in {seconds:.1f}s ({m['tokens']['documents'] / seconds:,.0f} tokens/s)")  # fmt: skip
    for name, s in m["splits"].items():
        print(
            f"  {name}: {s['num_samples']} samples × {m['sample_len']} ({m['dtype']}) in {len(s['shards'])} shard(s)"
        )
    if m["skipped"]["total"]:
        print(f"skipped {m['skipped']['total']} document(s): {json.dumps(m['skipped']['by_reason'])} "
              f"(examples in {args.out}/manifest.json)")  # fmt: skip
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from mobillama.data.shards import inspect_shards

    print(inspect_shards(args.dir, split=args.split, sample=args.sample, show_tokens=args.tokens))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from mobillama.data.shards import verify_shards

    m = verify_shards(args.dir)
    n = sum(len(s["shards"]) for s in m["splits"].values())
    print(f"{args.dir}: all {n} shard(s) match the manifest")
    return 0
