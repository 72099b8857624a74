"""MobiLlama: small Llama-style language models whose one feed-forward network is shared by every layer.

Importing the package registers the Hugging Face classes with ``AutoConfig`` / ``AutoModelForCausalLM``,
so ``AutoModelForCausalLM.from_pretrained(checkpoint_dir)`` works after a plain ``import mobillama``.
"""

from mobillama.checkpoint import load_model, save_checkpoint
from mobillama.config import PRESETS, ModelConfig, get_preset
from mobillama.errors import MobiLlamaError
from mobillama.hf import MobiLlamaConfig, MobiLlamaForCausalLM
from mobillama.model import KVCache, MobiLlama

__version__ = "0.1.0"

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
