"""Format conversion, in one place: Hugging Face Llama checkpoints in; Llama and GGUF out.

- :func:`import_hf` (``mobillama convert from-hf``): the original MobiLlama release or any plain Llama
  checkpoint → a project checkpoint, verifying that per-layer FFN copies really are one shared FFN.
- :func:`export_llama` (``mobillama convert to-llama``): a project checkpoint → a stock
  ``LlamaForCausalLM`` checkpoint (FFN duplicated per layer) that transformers loads without this package.
- :func:`export_gguf` (``mobillama convert to-gguf``): a project checkpoint → a llama.cpp GGUF file.

Project tensor names map to Llama names only here (:func:`llama_state_dict`).
"""

from mobillama.convert.from_hf import ImportReport, import_hf
from mobillama.convert.to_gguf import GGUF_TYPES, GGUFReport, export_gguf, read_gguf_weights
from mobillama.convert.to_llama import export_llama, llama_config, llama_state_dict

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
