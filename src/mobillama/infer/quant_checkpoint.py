"""Quantized checkpoint directories: write one (``mobillama quantize``), read its ``quantization.json``,
and load it straight into quantized layers (no full-precision copy is ever built).

A quantized checkpoint is a normal checkpoint directory (config.json, model.safetensors, tokenizer
files) plus ``quantization.json``; the layers themselves are :mod:`mobillama.infer.quant`'s. Which kind
a directory is, is decided in one place: :func:`mobillama.infer.load.describe_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from mobillama.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    SafetensorsReader,
    check_state_dict,
    load_model,
    read_json_object,
    save_checkpoint,
    unique_state_dict,
)
from mobillama.config import ModelConfig
from mobillama.errors import MobiLlamaError
from mobillama.infer.quant import (
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    QuantizedLinear,
    check_bits,
    check_head_bits,
    check_int4_params,
    check_int8_group,
    check_kernels,
    pack_for_inference,
    quantize_model,
    quantized_module_count,
    release_freed_memory,
    set_submodule,
    weight_bytes,
)
from mobillama.model import MobiLlama

QUANT_FILE = "quantization.json"


def read_quantization(path: str | Path) -> dict[str, Any]:
    """The ``quantization.json`` of a checkpoint, checked."""
    file = Path(path) / QUANT_FILE
    info = read_json_object(file)
    for key in ("bits", "group_size", "modules"):
        if key not in info:
            raise MobiLlamaError(f"{file}: missing key {key!r}")
    try:
        check_bits(info["bits"], info["group_size"] if info["bits"] == 4 else None)
    except MobiLlamaError as e:
        raise MobiLlamaError(f"{file}: {e}") from None
    if not isinstance(info["modules"], list) or not all(isinstance(m, str) for m in info["modules"]):
        raise MobiLlamaError(f"{file}: 'modules' must be a list of module names")
    # Written since the head (a tied one too) is quantized by default; older files lack it and say the
    # same thing through 'modules' (a tied head was never listed: it stayed the float embedding).
    head = info.setdefault("quantize_head", "lm_head" in info["modules"])
    if head is not ("lm_head" in info["modules"]):
        raise MobiLlamaError(
            f"{file}: 'quantize_head' is {head!r} but 'lm_head' is "
            f"{'' if 'lm_head' in info['modules'] else 'not '}listed in 'modules'"
        )
    # Written since an int4 body can carry an int8 head; older files quantized the head at 'bits'.
    if info.get("head_bits") is None and head:
        info["head_bits"] = info["bits"]
    head_bits = info.setdefault("head_bits", None)
    if head_bits is not None and not head:
        raise MobiLlamaError(f"{file}: 'head_bits' is {head_bits!r} but 'quantize_head' is {head!r}")
    # Written since int8 layers can have a scale per group; older files have one per channel.
    info.setdefault("int8_group_size", None)
    try:
        check_head_bits(info["bits"], head_bits)
        check_int8_group(info["int8_group_size"], info["bits"], head_bits)
    except MobiLlamaError as e:
        raise MobiLlamaError(f"{file}: {e}") from None
    return info


def quantize_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    bits: int,
    group_size: int | None = None,
    overwrite: bool = False,
    quantize_head: bool | None = None,
    head_bits: int | None = None,
    int4_params: str = "auto",
    int8_group_size: int | None = None,
) -> dict[str, Any]:
    """Quantize a checkpoint directory and write a quantized checkpoint directory (atomically).

    The directory is a normal checkpoint (config.json, model.safetensors, tokenizer files) plus
    ``quantization.json``; the safetensors file holds the packed weights and their scales, a shared
    FFN once. ``quantize_head``, ``head_bits``, ``int4_params``, ``int8_group_size``: see :func:`~mobillama.infer.quant.quantize_model` (default: an untied head
    quantized, a tied one, the embedding table, kept in float).
    Returns a summary (bytes before/after, module counts).
    """
    check_bits(bits, group_size)  # every argument checked before the model is read
    check_head_bits(bits, head_bits)
    check_int4_params(int4_params)
    check_int8_group(int8_group_size, bits, head_bits)
    model = load_model(checkpoint, dtype=torch.float32)
    before = weight_bytes(model)
    quantize_model(
        model,
        bits,
        group_size,
        pack=False,
        quantize_head=quantize_head,
        head_bits=head_bits,
        int4_params=int4_params,
        int8_group_size=int8_group_size,
    )
    info = {"format": "mobillama-weight-only", "method": "weight-only", **model.quantization}  # type: ignore[attr-defined]
    # Quantized layers keep fp32 scales/zeros; everything left in floating point (embeddings, norms) is
    # stored in bf16, the compute dtype the quantized kernels use.
    qparams = {f"{m}.{b}" for m in [*info["modules"], "model.embed_tokens"] for b in ("scales", "zeros")}
    # A tied LM head is the embedding table, stored once under the embedding's name: float, or the
    # quantized weight and scales the head and the embedding lookups share.
    tied = model.config.tie_word_embeddings
    state = {
        k: v.to(torch.bfloat16) if v.is_floating_point() and k not in qparams else v
        for k, v in unique_state_dict(model.state_dict(), model.config).items()
        if not (tied and k.startswith("lm_head."))
    }
    save_checkpoint(
        state,
        model.config,
        out_dir,
        tokenizer_dir=checkpoint,
        extra_files={QUANT_FILE: info},
        overwrite=overwrite,
    )
    return {
        "out": str(out_dir),
        "bits": bits,
        "group_size": info["group_size"],
        "quantized_layers": quantized_module_count(model),
        "quantize_head": info["quantize_head"],
        "head_bits": info["head_bits"],
        "int4_params_layers": info.get("int4_params_layers"),
        "int8_group_size": info["int8_group_size"],
        "bytes_before": before,
        "bytes_after": sum(v.numel() * v.element_size() for v in state.values()),
    }


def load_quantized(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    int8_kernel: str = "auto",
    int4_kernel: str = "auto",
    pack: bool = True,
) -> nn.Module:
    """Load a quantized checkpoint directly (no full-precision copy is ever built)."""
    check_kernels(int8_kernel, int4_kernel)

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise MobiLlamaError(f"{path} is not a checkpoint directory (no {CONFIG_NAME})")
    info = read_quantization(path)
    config = ModelConfig.load(path / CONFIG_NAME)
    with torch.device("meta"):
        model = MobiLlama(config)
    linears = dict.fromkeys(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    unknown = [m for m in info["modules"] if m not in linears]
    if unknown:
        raise MobiLlamaError(f"{path / QUANT_FILE}: {unknown[0]!r} is not a Linear layer of this model")
    tied_quantized = config.tie_word_embeddings and "lm_head" in info["modules"]
    for name in info["modules"]:
        linear = model.get_submodule(name)
        with torch.device("meta"):
            q = (
                Int8Linear(
                    linear.in_features, linear.out_features, int8_kernel, group_size=info["int8_group_size"]
                )
                if (info["head_bits"] if name == "lm_head" else info["bits"]) == 8
                else Int4Linear(linear.in_features, linear.out_features, info["group_size"], int4_kernel)
            )
        set_submodule(model, name, q)
    if tied_quantized:  # the head's quantized matrix, stored under the embedding's name, serves both
        with torch.device("meta"):
            head_bits = info["head_bits"]
            model.model.embed_tokens = QuantizedEmbedding(
                config.vocab_size,
                config.hidden_size,
                head_bits,
                info["group_size"] if head_bits == 4 else info["int8_group_size"],
                dtype,
            )
    expected = model.state_dict()
    if config.tie_word_embeddings:  # the tied head is stored once, as the embedding
        expected = {k: v for k, v in expected.items() if not k.startswith("lm_head.")}
    weights = SafetensorsReader(path / WEIGHTS_NAME)
    check_state_dict(
        weights.shapes_and_dtypes(),
        {k: v.shape for k, v in expected.items()},
        str(path / WEIGHTS_NAME),
        dtypes={k: v.dtype for k, v in expected.items()},
    )
    quantized_keys = {
        f"{m}.{b}" for m in [*info["modules"], "model.embed_tokens"] for b in ("scales", "zeros")
    }
    by_module: dict[str, list[str]] = {}
    for key in weights.entries:
        by_module.setdefault(key.rpartition(".")[0], []).append(key)
    # Module by module, and each quantized layer packed for its kernel (freeing its portable form)
    # before the next is read: memory then never holds the whole portable model beside the packed one.
    # An untied embedding table stays a view of the mapped file (inference may read it from the file row
    # by row instead); a tied one is the LM head too, read whole at every step, so it is read like the rest.
    for name, keys in by_module.items():
        module = model.get_submodule(name)
        local = {}
        for key in keys:
            if key == "model.embed_tokens.weight" and not config.tie_word_embeddings:
                with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
                    tensor = f.get_tensor(key).to(dtype)
            else:
                tensor = weights.read(key)
                if tensor.is_floating_point():
                    tensor = tensor.to(torch.float32 if key in quantized_keys else dtype)
            local[key.rpartition(".")[2]] = tensor
        module.load_state_dict(local, strict=False, assign=True)
        if pack and isinstance(module, QuantizedLinear):
            module.pack()
            release_freed_memory()  # glibc would otherwise keep the freed portable form in its heap
    if tied_quantized:
        model.model.embed_tokens.share_with(model.lm_head)
    elif config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.quantization = {k: info[k] for k in ("bits", "group_size", "modules", "quantize_head", "head_bits")}  # type: ignore[attr-defined]
    model.eval()
    if pack:
        pack_for_inference(model)
    return model


__all__ = ["QUANT_FILE", "load_quantized", "quantize_checkpoint", "read_quantization"]
