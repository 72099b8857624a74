"""A tiny random checkpoint with a real tokenizer and chat template, built in seconds without a hub.

The server's end-to-end tests and its load benchmark need a real :class:`~mobillama.infer.generator.Generator`
over a real checkpoint directory (so the path ``mobillama serve CKPT`` takes is the one exercised),
but no model may be downloaded here: this builds one from a preset with random weights and a
byte-level BPE trained on a few Python standard-library files.
"""

from __future__ import annotations

import sysconfig
import tempfile
from pathlib import Path

import torch

from mobillama.checkpoint import save_checkpoint
from mobillama.config import get_preset
from mobillama.model import MobiLlama

# Jinja trims a literal newline after a {% %} tag, so newlines are emitted as expressions.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{{ '\\n' }}{{ m['content'] }}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{{ '\\n' }}{% endif %}"
)
TRAIN_FILES = ("textwrap.py", "shlex.py", "fnmatch.py")


def build_tokenizer(out_dir: str | Path, vocab_size: int = 320) -> Path:
    """A byte-level BPE (Llama ids: <unk>=0, <s>=1, </s>=2, and Llama's <s> in front of text) with a chat
    template, saved for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((stdlib / name).read_text(encoding="utf-8") for name in TRAIN_FILES)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out_dir))
    return Path(out_dir)


def make_tiny_checkpoint(
    out_dir: str | Path, preset: str = "micro", context: int = 256, seed: int = 0, vocab_size: int = 320
) -> Path:
    """A random-weight checkpoint of ``preset`` (vocabulary resized to the tokenizer) with its tokenizer."""
    config = get_preset(preset).replace(vocab_size=vocab_size, max_position_embeddings=context)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        build_tokenizer(tokenizer_dir, vocab_size)
        return save_checkpoint(MobiLlama(config), config, out_dir, tokenizer_dir=tokenizer_dir)
