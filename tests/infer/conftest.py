"""Fixtures for the inference tests: a byte-level tokenizer double, a real BPE tokenizer directory, tiny
checkpoints, and a tiny model trained briefly on real text (for the quantization quality check). The BPE
tokenizer and the tied checkpoints come from the shared ``fixtures`` builders."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import pytest
import torch

from fixtures import byte_bpe_tokenizer, save_micro_checkpoint
from mobillama.config import get_preset
from mobillama.model import MobiLlama, causal_lm_loss
from mobillama.tokenizer import render_chat


class ByteTokenizer:
    """The tokenizer interface over raw UTF-8 bytes (id = byte + 3); one token per byte, so any stop
    string of several characters spans several tokens, and a multi-byte character spans tokens too."""

    vocab_size = 259
    bos_id, pad_id, unk_id = 1, 0, 0

    def __init__(self, eos_id: int = 2) -> None:
        self.eos_id = eos_id

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return render_chat(messages, add_generation_prompt)


@pytest.fixture
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


def byte_config(**changes):
    """The micro shape (GQA, 4 layers, one shared FFN) with the byte tokenizer's vocabulary and an FFN
    width that int4 groups of 32/64 divide."""
    changes = {"vocab_size": ByteTokenizer.vocab_size, "intermediate_size": 192, **changes}
    return get_preset("micro").replace(**changes)


@pytest.fixture
def byte_model():
    def make(seed: int = 0, ascii_only: bool = False, **changes) -> MobiLlama:
        torch.manual_seed(seed)
        model = MobiLlama(byte_config(**changes)).eval()
        if ascii_only:  # zero logit for special ids and non-ASCII bytes: greedy text is plain ASCII
            with torch.no_grad():
                model.lm_head.weight[:3] = 0
                model.lm_head.weight[128 + 3 :] = 0
        return model

    return make


def stdlib_text(names: list[str]) -> str:
    """Real text: Python standard library sources (always installed)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((root / n).read_text(encoding="utf-8") for n in names)


TRAIN_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "argparse.py"]
HELD_OUT_FILES = ["colorsys.py", "keyword.py"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE (vocab 512, <unk>=0 <s>=1 </s>=2, <s> in front of text as in Llama) trained on
    stdlib source, saved for AutoTokenizer."""
    out = tmp_path_factory.mktemp("tokenizer")
    byte_bpe_tokenizer([stdlib_text(TRAIN_FILES)], 512, unk_in_model=False).save_pretrained(out)
    return out


BPE_CONFIG = dict(vocab_size=512, max_position_embeddings=256)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """An untrained tiny checkpoint (one shared FFN) carrying the BPE tokenizer."""
    from mobillama.checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = get_preset("tiny").replace(**BPE_CONFIG)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    return save_checkpoint(MobiLlama(config), config, out, tokenizer_dir=tokenizer_dir)


def token_blocks(tokenizer_dir: Path, files: list[str], length: int) -> torch.Tensor:
    from mobillama.tokenizer import load_tokenizer

    ids = load_tokenizer(tokenizer_dir).encode(stdlib_text(files))
    n = len(ids) // length
    return torch.tensor(ids[: n * length]).view(n, length)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """A small model (4 layers, hidden 64, one shared FFN) trained for 120 AdamW steps on stdlib source:
    cheap enough for the suite, trained enough that quantization error shows in perplexity.
    ``benchmarks/quant_quality.py`` runs the same check on a larger model for longer."""
    from mobillama.checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = get_preset("micro").replace(intermediate_size=192, **BPE_CONFIG)
    model = MobiLlama(config)
    data = token_blocks(tokenizer_dir, TRAIN_FILES, 65)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread avoids barrier stalls on a busy machine
    for _ in range(120):
        batch = data[torch.randint(0, len(data), (16,), generator=gen)]
        loss = causal_lm_loss(model(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("trained") / "micro-trained"
    return save_checkpoint(model.eval(), config, out, tokenizer_dir=tokenizer_dir)


def perplexity(model, blocks: torch.Tensor) -> float:
    with torch.inference_mode():
        loss = causal_lm_loss(model(blocks).float(), blocks)
    return math.exp(loss.item())


@pytest.fixture(scope="session")
def held_out_blocks(tokenizer_dir) -> torch.Tensor:
    return token_blocks(tokenizer_dir, HELD_OUT_FILES, 65)


@pytest.fixture
def ppl():
    return perplexity


@pytest.fixture(scope="session")
def tied_checkpoints(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Untrained tiny checkpoints shaped like SmolLM2 (tied embeddings, GQA) with the BPE tokenizer, one
    per FFN sharing ("none": a plain Llama, "all": MobiLlama)."""
    root = tmp_path_factory.mktemp("tied")
    return {
        sharing: save_micro_checkpoint(
            root / f"tied-{sharing}",
            tokenizer_dir,
            embed_scale=20,  # a larger logit spread than the 0.02 init, so greedy choices are clear-cut
            intermediate_size=192,
            tie_word_embeddings=True,
            ffn_sharing=sharing,
            **BPE_CONFIG,
        )
        for sharing in ("none", "all")
    }


@pytest.fixture(scope="session")
def tied_quantized(tmp_path_factory, tied_checkpoints):
    """``tied_quantized(sharing, bits, head=True)``: the tied checkpoint quantized, its head (the table)
    too unless ``head`` is False (written once per session)."""
    from mobillama.infer.quant_checkpoint import quantize_checkpoint

    root = tmp_path_factory.mktemp("tied-q")
    done: dict[tuple[str, int, bool], Path] = {}

    def get(sharing: str, bits: int, head: bool = True) -> Path:
        if (sharing, bits, head) not in done:
            out = root / f"{sharing}-int{bits}{'' if head else '-float-head'}"
            quantize_checkpoint(tied_checkpoints[sharing], out, bits, quantize_head=head)
            done[sharing, bits, head] = out
        return done[sharing, bits, head]

    return get
