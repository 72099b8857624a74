"""MobiLlama: small Llama-style language models whose one feed-forward network is shared by every layer.

``import mobillama`` imports neither transformers (~155 MB resident, ~2.5 s) nor torch (~0.22 GB, ~1.5 s):
every public name below is imported on its first use (PEP 562 module ``__getattr__``), so the command
line answers ``--help`` at once and the lean runtime (:mod:`mobillama.infer.lean`) runs without torch.
Loading a checkpoint
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

from mobillama.errors import MobiLlamaError

if TYPE_CHECKING:
    from mobillama.checkpoint import load_model, save_checkpoint
    from mobillama.config import PRESETS, ModelConfig, get_preset
    from mobillama.hf import MobiLlamaConfig, MobiLlamaForCausalLM
    from mobillama.model import KVCache, MobiLlama

__version__ = "0.1.0"

# Public names -> the module that defines them, imported on first use. mobillama.hf imports transformers
# and registers the Auto classes; the others import torch.
_LAZY = {
    "MobiLlamaConfig": "mobillama.hf",
    "MobiLlamaForCausalLM": "mobillama.hf",
    "load_model": "mobillama.checkpoint",
    "save_checkpoint": "mobillama.checkpoint",
    "PRESETS": "mobillama.config",
    "ModelConfig": "mobillama.config",
    "get_preset": "mobillama.config",
    "KVCache": "mobillama.model",
    "MobiLlama": "mobillama.model",
}


def __getattr__(name: str) -> Any:
    """Import the module behind ``name`` on its first use (see the module docstring)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups are plain attribute hits
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
