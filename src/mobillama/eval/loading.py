"""The model that evaluation scores (a plain or a quantized checkpoint, through the inference loaders) and
the tokenizer it is scored with.

Benchmarks (``harness``) and perplexity load the same way, so a quantized checkpoint (``mobillama
quantize``: ``quantization.json`` beside the weights) is scored exactly as ``generate`` runs it:
:func:`mobillama.infer.quant_checkpoint.load_quantized`, with the CPU kernels chosen as there (``auto``).
On another device the quantized layers stay in their portable form and run the dequantizing reference
path there. Which kind a directory is, :func:`mobillama.infer.load.describe_checkpoint` says.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mobillama.checkpoint import load_model
from mobillama.errors import MobiLlamaError
from mobillama.infer.load import describe_checkpoint
from mobillama.infer.quant_checkpoint import load_quantized


def load_eval_model(
    checkpoint: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """A model in eval mode on ``device``; ``dtype`` is the activations' (and float weights') dtype.

    Quantized layers keep their int8/int4 weights (scored as quantized, not re-expanded); everything else
    is loaded as :func:`mobillama.checkpoint.load_model` does.
    """
    if not describe_checkpoint(checkpoint, presets=False).is_quantized:
        return load_model(checkpoint, dtype=dtype, device=device)
    device = torch.device(device)
    model = load_quantized(checkpoint, dtype=dtype, pack=device.type == "cpu")
    return model.to(device).eval()


def quantization_of(checkpoint: str | Path) -> dict | None:
    """``bits``/``group_size`` of a quantized checkpoint (for reports), None for a plain one."""
    info = describe_checkpoint(checkpoint, presets=False).quantization
    return None if info is None else {"bits": info["bits"], "group_size": info["group_size"]}


def load_eval_tokenizer(checkpoint: str | Path):
    """The checkpoint's Hugging Face tokenizer, with a pad token (eos) for batched generation."""
    # transformers (~2.5 s, ~150 MB) only here: loading a model to score stays torch-only, as in inference
    from transformers import AutoTokenizer

    path = Path(checkpoint)
    if not path.is_dir():
        raise MobiLlamaError(f"checkpoint not found: {path}")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise MobiLlamaError(
            f"{path}: no tokenizer files (tokenizer.json or tokenizer.model); evaluation needs the "
            "tokenizer the model was trained with"
        )
    import mobillama.hf  # noqa: F401  registers model_type mobillama, else transformers warns reading config.json

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
