"""Format conversion, in one place: Hugging Face Llama checkpoints in; Llama and GGUF out.

- :func:`import_hf` (``mobillama convert from-hf``): the original MobiLlama release or any plain Llama
  checkpoint → a project checkpoint, verifying that per-layer FFN copies really are one shared FFN.
- :func:`export_llama` (``mobillama convert to-llama``): a project checkpoint → a stock
  ``LlamaForCausalLM`` checkpoint (FFN duplicated per layer) that transformers loads without this package.
- :func:`export_gguf` (``mobillama convert to-gguf``): a project checkpoint → a llama.cpp GGUF file.

Project tensor names map to Llama names only here (:func:`llama_state_dict`).
"""

import importlib
from typing import Any

# public name -> the module that defines it, imported on first use (PEP 562): the converters import
# torch, and importing a light submodule (``mobillama.convert.fetch`` for the command line's help) must not.
_HOME = {
    "ImportReport": "from_hf",
    "import_hf": "from_hf",
    "GGUF_TYPES": "to_gguf",
    "GGUFReport": "to_gguf",
    "export_gguf": "to_gguf",
    "read_gguf_weights": "to_gguf",
    "export_llama": "to_llama",
    "llama_config": "to_llama",
    "llama_state_dict": "to_llama",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "GGUF_TYPES",
    "GGUFReport",
    "ImportReport",
    "export_gguf",
    "export_llama",
    "import_hf",
    "llama_config",
    "llama_state_dict",
    "read_gguf_weights",
]
