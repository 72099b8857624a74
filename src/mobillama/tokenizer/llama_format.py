"""Llama's tokenizer conventions and the Hugging Face file names: what every tokenizer built here follows.

The token names (``<unk>``, ``<s>``, ``</s>``, the 256 byte-fallback pieces), the SentencePiece ``▁`` word
marker, the names of the files a tokenizer directory holds, and the three helpers that give a ``tokenizers``
backend Llama-2's normaliser, decoder and BOS post-processor and wrap it as a ``PreTrainedTokenizerFast``.
They live apart because conversion (:mod:`.from_sentencepiece`), loading (:mod:`.load`) and training
(:mod:`.train`) all build the same kind of object, and the special-token rules read the same files.
"""

from __future__ import annotations

from typing import Any

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
SPIECE_UNDERLINE = "▁"
METADATA_FILE = "mobillama_tokenizer.json"
SP_MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


# ---- building HF objects ---------------------------------------------------------------------------
def _wrap_backend(backend: Any, **special: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = {k: v for k, v in {"unk_token": UNK, "bos_token": BOS, "eos_token": EOS}.items() if v in vocab}
    tokens.update(special)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **tokens)
    return hf


def _llama_pipeline(backend: Any, *, add_dummy_prefix: bool = True) -> None:
    """Llama's normaliser, decoder and BOS post-processor (the layout of Llama-2's tokenizer.json)."""
    from tokenizers import decoders, normalizers

    steps = [normalizers.Prepend(SPIECE_UNDERLINE)] if add_dummy_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPIECE_UNDERLINE)])
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace(SPIECE_UNDERLINE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            *([decoders.Strip(" ", 1, 0)] if add_dummy_prefix else []),
        ]
    )
    _bos_post_processor(backend)


def _bos_post_processor(backend: Any) -> None:
    """AutoTokenizer users get Llama's ``<s> text`` with ``add_special_tokens=True``."""
    from tokenizers import processors

    bos_id = backend.token_to_id(BOS)
    if bos_id is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
        )
