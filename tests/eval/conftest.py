"""Shared fixtures for the eval tests: a tiny byte-level BPE tokenizer and random checkpoints using it
(built by the shared ``fixtures`` builders)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures import byte_bpe_tokenizer, save_micro_checkpoint, tokenizer_vocab_size

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. A man is sitting on a roof.",
    "Question: What is the capital of France?\nAnswer: Paris is the capital of France.",
    "She picked up the guitar and started playing a song about the sea and the sky.",
    'Numbers 0123456789 and punctuation, like commas; colons: and quotes "x".',
]


def build_tokenizer(out_dir: Path, vocab_size: int = 256) -> Path:
    """A byte-level BPE tokenizer with Llama special ids (<unk>=0, <s>=1, </s>=2) that prepends <s>."""
    out_dir.mkdir(parents=True, exist_ok=True)
    byte_bpe_tokenizer(TRAIN_TEXT * 20, vocab_size, model_max_length=10**6).save_pretrained(str(out_dir))
    return out_dir


def build_checkpoint(
    root: Path, *, max_len: int = 256, seed: int = 0, name: str = "ckpt", embed_scale: float = 1.0, **changes
) -> Path:
    """``changes``: ModelConfig fields over the micro preset; ``embed_scale`` widens the embedding (and a
    tied head's) spread beyond the 0.02 init, so the model has clear preferences to score."""
    tok_dir = build_tokenizer(root / f"{name}-tok")
    return save_micro_checkpoint(
        root / name,
        tok_dir,
        vocab_size=max(tokenizer_vocab_size(tok_dir), 8),
        seed=seed,
        embed_scale=embed_scale,
        max_position_embeddings=max_len,
        **changes,
    )


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("eval-ckpt"))


@pytest.fixture(scope="session")
def short_checkpoint(tmp_path_factory) -> Path:
    """max_position_embeddings 24: long contexts must be left-truncated."""
    return build_checkpoint(tmp_path_factory.mktemp("eval-short"), max_len=24, seed=1)


@pytest.fixture(scope="session")
def tied_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A SmolLM2-shaped tiny model (tied embeddings, GQA, one FFN per layer) in float ("float") and
    quantized by ``mobillama quantize`` ("int8", "int4": the tied head quantized too, the default;
    "int8-keep-head", "int4-keep-head": the head kept in float)."""
    from mobillama.infer.quant_checkpoint import quantize_checkpoint

    root = tmp_path_factory.mktemp("eval-tied")
    tied = build_checkpoint(
        root,
        name="float",
        embed_scale=5.0,
        tie_word_embeddings=True,
        ffn_sharing="none",
        intermediate_size=192,
    )
    out = {"float": tied}
    for bits in (8, 4):
        out[f"int{bits}"] = Path(
            quantize_checkpoint(tied, root / f"int{bits}", bits, quantize_head=True)["out"]
        )
        keep = quantize_checkpoint(tied, root / f"int{bits}-keep-head", bits, quantize_head=False)
        out[f"int{bits}-keep-head"] = Path(keep["out"])
    return out
