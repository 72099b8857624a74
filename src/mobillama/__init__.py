"""MobiLlama: small Llama-style language models whose one feed-forward network is shared by every layer.

``import mobillama`` does not import transformers (~155 MB resident, ~2.5 s): loading a checkpoint
(:func:`load_model`), generating (:mod:`mobillama.infer.generator`) and quantized checkpoints
(:mod:`mobillama.infer.quant_checkpoint`) only need torch, so CPU decode's peak memory stays close to the weights.

The Hugging Face classes ``MobiLlamaConfig`` / ``MobiLlamaForCausalLM`` are loaded on first use
(PEP 562 module ``__getattr__``): touching ``mobillama.MobiLlamaForCausalLM``, ``from mobillama import
MobiLlamaConfig``, or ``import mobillama.hf`` imports transformers and registers model_type ``mobillama``
with ``AutoConfig`` / ``AutoModelForCausalLM``. To load a checkpoint through the Auto classes (pipelines,
lm-eval's ``hf`` backend, peft), ``import mobillama.hf`` first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mobillama.checkpoint import load_model, save_checkpoint
from mobillama.config import PRESETS, ModelConfig, get_preset
from mobillama.errors import MobiLlamaError
from mobillama.model import KVCache, MobiLlama

if TYPE_CHECKING:
    from mobillama.hf import MobiLlamaConfig, MobiLlamaForCausalLM

__version__ = "0.1.0"

# Public names that live in mobillama.hf: importing it imports transformers, so it waits for first use.
_HF_NAMES = frozenset({"MobiLlamaConfig", "MobiLlamaForCausalLM"})


def __getattr__(name: str) -> Any:
    """Import :mod:`mobillama.hf` (and so transformers, and the Auto registration) on first use of its names."""
    if name in _HF_NAMES:
        value = getattr(importlib.import_module("mobillama.hf"), name)
        globals()[name] = value  # later lookups are plain attribute hits
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _HF_NAMES)


__all__ = [
    "PRESETS",
    "KVCache",
    "MobiLlama",
    "MobiLlamaConfig",
    "MobiLlamaError",
    "MobiLlamaForCausalLM",
    "ModelConfig",
    "get_preset",
    "load_model",
    "save_checkpoint",
]
