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
