"""Builders shared by every test folder: token-shard directories, small tokenizers and tiny checkpoints.

Importable as ``fixtures`` (pyproject's pytest ``pythonpath``): pytest's importlib mode makes conftest
files unimportable by name, so what several folders build lives here, once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from mobillama.checkpoint import save_checkpoint
from mobillama.config import get_preset
from mobillama.data.shards import FORMAT, FORMAT_VERSION, MANIFEST
from mobillama.model import MobiLlama


def write_token_shards(
    out: Path,
    splits: dict[str, list[np.ndarray]],
    *,
    vocab_size: int,
    dtype: str = "uint16",
    bos_id: int = 1,
    eos_id: int = 2,
    split_fields: dict[str, dict] | None = None,
) -> Path:
    """A shard directory in the format of :mod:`mobillama.data.shards`, written here with numpy
    (independent of ``mobillama data prepare``): ``splits`` maps a split to its shards' rows, each an
    array ``[num_samples, seq_len + 1]``; ``split_fields`` adds fields to a split's manifest entry."""
    widths = {rows.shape[1] for shards in splits.values() for rows in shards}
    assert len(widths) == 1, f"every row must have the same length, got {sorted(widths)}"
    sample_len = widths.pop()
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "seq_len": sample_len - 1,
        "sample_len": sample_len,
        "dtype": dtype,
        "vocab_size": vocab_size,
        "tokenizer_sha256": "test",
        "bos_id": bos_id,
        "eos_id": eos_id,
        "splits": {},
    }
    for split, shards in splits.items():
        entries, offset = [], 0
        for i, rows in enumerate(shards):
            path = out / f"{split}-{i:05d}.bin"
            rows.astype(dtype).tofile(path)
            entries.append(
                {
                    "path": path.name,
                    "num_samples": len(rows),
                    "sample_offset": offset,
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                }
            )
            offset += len(rows)
        manifest["splits"][split] = {
            "shards": entries,
            "num_samples": offset,
            "num_tokens": offset * sample_len,
            **(split_fields or {}).get(split, {}),
        }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def edit_manifest(directory: Path, edit) -> None:
    """Apply ``edit(manifest)`` to ``directory``'s manifest.json in place."""
    manifest = json.loads((directory / MANIFEST).read_text())
    edit(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


# ---- tokenizers -------------------------------------------------------------------------------------------
# transformers and tokenizers are imported inside the builders: collecting a test folder that needs no
# tokenizer stays fast.

# SmolLM2-135M-Instruct's chat template (ChatML with a default system prompt), as its tokenizer_config.json has it.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
SMOL_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How can I help you today? I am a helpful assistant.",
    "Paris is the capital of France. 2 + 2 = 4, and 12345 is a number.",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "system user assistant: what is the weather like? It is sunny and warm.",
]


def build_smol_tokenizer(out_dir: Path, *, vocab_size: int = 384, template: str = CHATML_TEMPLATE) -> Path:
    """A tiny tokenizer with SmolLM2's conventions: GPT-2 byte-level BPE (digits split), ``<|endoftext|>``=0
    (separator, unk), ``<|im_start|>``=1 (bos), ``<|im_end|>``=2 (eos, pad), a ByteLevel post-processor that
    adds no special token, ``add_bos_token: false`` and a ChatML template, saved as an HF directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SMOL_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SMOL_TEXT * 10, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = template
    out_dir = Path(out_dir)
    hf.save_pretrained(str(out_dir), save_jinja_files=False)
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config_file.write_text(json.dumps({**config, "add_bos_token": False}, indent=2), encoding="utf-8")
    return out_dir


LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2


def byte_bpe_tokenizer(
    texts: list[str],
    vocab_size: int,
    *,
    chat_template: str | None = None,
    unk_in_model: bool = True,
    **hf_kwargs,
):
    """A byte-level BPE (GPT-2 bytes, no prefix space) with Llama's special ids (``<unk>``=0, ``<s>``=1,
    ``</s>``=2) and Llama's convention of ``<s>`` in front of text, trained on ``texts``; returned as a
    ``PreTrainedTokenizerFast`` (``hf_kwargs``: pad token, model_max_length, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>") if unk_in_model else models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=LLAMA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # <s> in front of text: what decides BOS for prompts (see mobillama.tokenizer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **hf_kwargs
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def llama_bpe_tokenizer(out: Path, vocab_size: int = 300) -> Path:
    """A small Llama-convention tokenizer (BPE, byte fallback, <unk>=0 <s>=1 </s>=2) saved as HF files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[*LLAMA_SPECIALS, *byte_tokens], show_progress=False
    )
    text = ["the shared feed forward network is used by every layer of the model"] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out))
    return out


# ---- checkpoints ------------------------------------------------------------------------------------------
def tokenizer_vocab_size(tokenizer_dir: Path) -> int:
    """The size of the model vocabulary in ``tokenizer.json`` (what a model for it needs)."""
    return len(json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())["model"]["vocab"])


def save_micro_checkpoint(
    out: Path,
    tokenizer_dir: Path,
    *,
    vocab_size: int | None = None,
    seed: int = 0,
    embed_scale: float = 1.0,
    **changes,
) -> Path:
    """A random micro MobiLlama carrying ``tokenizer_dir``'s files: its vocabulary is the tokenizer's
    unless ``vocab_size`` says otherwise, ``changes`` are further ModelConfig fields, and ``embed_scale``
    widens the embedding (and a tied head's) spread beyond the 0.02 init, so the model has clear
    preferences."""
    vocab = vocab_size if vocab_size is not None else tokenizer_vocab_size(tokenizer_dir)
    config = get_preset("micro").replace(vocab_size=vocab, **changes)
    torch.manual_seed(seed)
    model = MobiLlama(config)
    if embed_scale != 1.0:
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(embed_scale)
    return save_checkpoint(model, config, out, tokenizer_dir=tokenizer_dir)


def build_smol_checkpoint(out_dir: Path, tokenizer_dir: Path, *, context: int = 128, seed: int = 0) -> Path:
    """A random micro model (vocabulary of the tokenizer) carrying a SmolLM2-style tokenizer."""
    return save_micro_checkpoint(
        out_dir, tokenizer_dir, seed=seed, max_position_embeddings=context, bos_token_id=1, eos_token_id=2
    )


def llama3_scaling(original_context: int) -> dict:
    """Llama 3.1's RoPE scaling parameters with a given original context (below a test's input length,
    all three frequency bands of the scaling are exercised)."""
    return {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original_context,
    }


def sampling_distribution(logits: torch.Tensor, params) -> torch.Tensor:
    """The probabilities the default runtime's ``sample_next`` draws from for fp32 logits [vocab] (after its
    penalty, temperature, top-k and top-p): the argument it hands to ``torch.multinomial``."""
    from unittest import mock

    from mobillama.infer.sampling import sample_next

    seen: dict[str, torch.Tensor] = {}

    def capture(probs, num_samples, generator=None):
        seen["probs"] = probs.clone()
        return torch.zeros(probs.shape[0], num_samples, dtype=torch.long)

    with mock.patch.object(torch, "multinomial", capture):
        sample_next(logits[None].float(), params)
    return seen["probs"][0].double()
