"""Loading for inference, and THE answer to "what is this model argument?".

:func:`describe_checkpoint` decides once what a path or name is: a preset (random weights), a plain
checkpoint directory (possibly imported from GGUF or Hugging Face format, which ``conversion.json``
records), a quantized checkpoint (``quantization.json``) or a MobiLlama-V checkpoint
(``vision_config.json``). Every command and loader asks it instead of looking for marker files itself.

:func:`load_for_inference` builds the model :class:`~mobillama.infer.generator.Generator` runs, and
:func:`load_checkpoint_tokenizer` its tokenizer. An untied embedding table is read row by row from the
checkpoint file (:class:`FileRowEmbedding`) instead of being held in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mobillama.checkpoint import WEIGHTS_NAME, load_model, safetensors_location
from mobillama.config import PRESETS, get_preset, parse_dtype, preset_name
from mobillama.errors import MobiLlamaError
from mobillama.infer import quant
from mobillama.infer.generator import TokenizerLike
from mobillama.infer.quant_checkpoint import QUANT_FILE, load_quantized, read_quantization
from mobillama.infer.quant_embedding import check_token_ids
from mobillama.model import MobiLlama
from mobillama.tokenizer import load_tokenizer
from mobillama.vision.checkpoint import VISION_CONFIG_NAME

CONVERSION_FILE = "conversion.json"  # written by `mobillama convert from-hf / from-gguf`
# CPU inference runs in fp32 or bf16 (fp16 matmuls have no fast CPU kernels).
INFERENCE_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class CheckpointKind:
    """What a model argument names. ``kind`` is "preset", "checkpoint", "quantized" or "vision";
    ``source_format`` is the format a checkpoint was imported from ("gguf", "hf"), None if trained here;
    ``quantization`` is a quantized checkpoint's checked ``quantization.json``."""

    spec: str
    kind: str
    path: Path | None = None
    source_format: str | None = None
    quantization: dict[str, Any] | None = None

    @property
    def is_preset(self) -> bool:
        return self.kind == "preset"

    @property
    def is_quantized(self) -> bool:
        return self.kind == "quantized"

    @property
    def is_vision(self) -> bool:
        return self.kind == "vision"


def describe_checkpoint(spec: str | Path, *, presets: bool = True) -> CheckpointKind:
    """Say what ``spec`` is (see :class:`CheckpointKind`); a one-line error when it is nothing loadable.

    A preset name counts only when no file of that name exists (and only with ``presets``). A directory's
    contents are checked by the loader that reads it, not here.
    """
    path = Path(spec)
    if presets and preset_name(spec):
        return CheckpointKind(str(spec), "preset")
    if not path.exists():
        if presets:
            raise MobiLlamaError(
                f"{str(spec)!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory"
            )
        raise MobiLlamaError(f"checkpoint not found: {spec}")
    if not path.is_dir():
        return CheckpointKind(str(spec), "checkpoint", path)  # the loader says what is wrong with it
    if (path / VISION_CONFIG_NAME).is_file():
        return CheckpointKind(str(spec), "vision", path)
    source = _source_format(path)
    if (path / QUANT_FILE).is_file():
        return CheckpointKind(str(spec), "quantized", path, source, read_quantization(path))
    return CheckpointKind(str(spec), "checkpoint", path, source)


def _source_format(path: Path) -> str | None:
    """``conversion.json``'s source format ("gguf", "hf"), None without one (or an unreadable one: it is a
    record of the import, not needed to load)."""
    with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        value = json.loads((path / CONVERSION_FILE).read_text(encoding="utf-8")).get("source_format")
        return value if isinstance(value, str) else None
    return None


def check_on_the_fly_quantization(
    spec: str | Path, what: CheckpointKind, bits: int | None, head_bits: int | None
) -> None:
    """The one rule for ``bits`` / ``head_bits`` asked of a loader (generate, chat, bench): a stored
    quantized checkpoint keeps its own bits and head, and ``head_bits`` only means something with ``bits``."""
    if what.is_quantized:
        held = what.quantization["bits"]  # type: ignore[index]
        if bits is not None and bits != held:
            raise MobiLlamaError(f"{spec} is already quantized to {held} bits")
        if head_bits is not None:
            raise MobiLlamaError(
                f"{spec} is already quantized: its head is as stored (head_bits applies to --bits)"
            )
    elif head_bits is not None and bits is None:
        raise MobiLlamaError("head_bits needs bits: it sets the head's bits when quantizing on the fly")


def load_for_inference(
    spec: str | Path,
    *,
    dtype: str | torch.dtype = "bf16",
    bits: int | None = None,
    group_size: int | None = None,
    int8_kernel: str = "auto",
    int4_kernel: str = "auto",
    seed: int = 0,
    quantize_head: bool | None = None,
    head_bits: int | None = None,
) -> MobiLlama:
    """A model ready to generate: a preset (random weights, built directly in ``dtype``), a checkpoint
    directory, or a quantized checkpoint directory (written by ``mobillama quantize``; loaded as is).

    ``bits`` quantizes a full-precision model on the fly (8 or 4); a quantized checkpoint keeps its own.
    ``quantize_head`` / ``head_bits`` choose what happens to the LM head then (see
    :func:`~mobillama.infer.quant.quantize_model`).
    """
    torch_dtype = parse_dtype(dtype, INFERENCE_DTYPES)
    what = describe_checkpoint(spec)
    if what.is_vision:
        raise MobiLlamaError(
            f"{spec} is a MobiLlama-V checkpoint ({VISION_CONFIG_NAME}); load it with "
            "mobillama.vision.chat.load_vision_chat"
        )
    check_on_the_fly_quantization(spec, what, bits, head_bits)
    if what.is_quantized:
        model = load_quantized(spec, dtype=torch_dtype, int8_kernel=int8_kernel, int4_kernel=int4_kernel)
        serve_embedding_from_file(model, spec)
        return model
    if what.is_preset:
        # Build in the target dtype directly: no fp32 copy of the whole model (peak memory).
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)
        try:
            model = MobiLlama(get_preset(str(spec))).eval()
        finally:
            torch.set_default_dtype(previous)
    else:
        model = load_model(spec, dtype=torch_dtype)
        serve_embedding_from_file(model, spec)
    if bits is not None:
        quant.quantize_model(
            model,
            bits,
            group_size,
            int8_kernel=int8_kernel,
            int4_kernel=int4_kernel,
            quantize_head=quantize_head,
            head_bits=head_bits,
        )
    return model


def load_checkpoint_tokenizer(path: str | Path) -> TokenizerLike:
    """The tokenizer stored in a checkpoint directory, with the checkpoint's generation_config.json stop ids
    (:func:`mobillama.tokenizer.load_tokenizer` reads them from the same directory)."""
    path = Path(path)
    if not path.is_dir() or not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise MobiLlamaError(f"{path} has no tokenizer files (tokenizer.json or tokenizer.model)")
    return load_tokenizer(path)


class FileRowEmbedding(torch.nn.Module):
    """An embedding lookup that reads the rows it needs from the checkpoint file instead of from memory.

    Why: at one token per step only a handful of the table's rows are ever used, but a table mapped from
    the file becomes resident in whole on the first lookups (each page fault maps a large block around
    the row), 131 MB for MobiLlama-0.5B - 12% of its bf16 weights. Reading rows with ``os.preadv`` keeps
    them in the OS page cache (shared, reclaimable) and out of the process.

    ``weight`` is a stand-in with the table's shape and dtype and no storage (one value, expanded), so
    code that asks for the dtype, shape or byte count of the embedding sees the real ones, and nothing
    keeps the checkpoint file mapped. Inference only: no gradient, and the module refuses to be saved.
    """

    def __init__(self, weight: torch.Tensor, file: str | Path, offset: int) -> None:
        super().__init__()
        stand_in = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
        self.register_buffer("weight", stand_in, persistent=False)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.file, self.offset = str(file), offset
        self.row_bytes = self.embedding_dim * weight.element_size()
        self._fd = os.open(self.file, os.O_RDONLY)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        check_token_ids(flat, self.num_embeddings)
        if not flat.numel():
            return torch.empty(*ids.shape, self.embedding_dim, dtype=self.weight.dtype)
        unique, inverse = torch.unique(flat, return_inverse=True)
        rows = torch.empty(len(unique), self.embedding_dim, dtype=self.weight.dtype)
        view = memoryview(rows.view(torch.uint8).reshape(-1).numpy())
        for i, token in enumerate(unique.tolist()):
            chunk = view[i * self.row_bytes : (i + 1) * self.row_bytes]
            if os.preadv(self._fd, [chunk], self.offset + token * self.row_bytes) != self.row_bytes:
                raise MobiLlamaError(f"{self.file}: embedding row {token} is past the end (file truncated?)")
        return rows[inverse].reshape(*ids.shape, self.embedding_dim)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        raise MobiLlamaError(
            "this model reads its embedding rows from the checkpoint file (loaded for inference); "
            "load it with mobillama.checkpoint.load_model to save it"
        )

    def __del__(self) -> None:
        # not contextlib.suppress: at interpreter exit this module's globals may already be None
        try:  # noqa: SIM105
            os.close(self._fd)
        except Exception:
            pass


def serve_embedding_from_file(model: MobiLlama, checkpoint_dir: str | Path) -> bool:
    """Swap the input embedding for a :class:`FileRowEmbedding` when the checkpoint's table can be read
    as is (same dtype, not tied to the LM head, CPU, Linux/macOS); returns whether it was swapped.

    A tied float table is left in memory: the head reads all of it at every step anyway, and the head
    and the embedding keep sharing that one tensor (reading rows from the file would save nothing). A
    tied *quantized* table (:class:`~mobillama.infer.quant.QuantizedEmbedding`) is read from the file
    once the head has repacked it for the stock int4 or fbgemm kernel (the vnni head already serves the
    rows from its packed matrix): the portable rows would otherwise be a second copy of the matrix; while
    the head still runs on them (weight-only int8, reference) they stay shared in memory."""
    embed = model.model.embed_tokens
    if isinstance(embed, quant.QuantizedEmbedding):
        return _quantized_rows_from_file(model, embed, checkpoint_dir)
    tied = model.config.tie_word_embeddings or getattr(model.lm_head, "weight", None) is embed.weight
    if tied or embed.weight.device.type != "cpu" or not hasattr(os, "preadv"):
        return False
    file = Path(checkpoint_dir) / WEIGHTS_NAME
    where = safetensors_location(file, "model.embed_tokens.weight")
    if where is None or where[1:] != (tuple(embed.weight.shape), embed.weight.dtype):
        return False
    model.model.embed_tokens = FileRowEmbedding(embed.weight, file, where[0])
    return True


def _quantized_rows_from_file(model: MobiLlama, embed: quant.QuantizedEmbedding, checkpoint_dir) -> bool:
    weight = embed.weight
    head_weight = getattr(model.lm_head, "weight", None)
    if weight is None or head_weight is weight or weight.device.type != "cpu" or not hasattr(os, "preadv"):
        return False
    file = Path(checkpoint_dir) / WEIGHTS_NAME
    where = safetensors_location(file, "model.embed_tokens.weight")
    if where is None or where[1:] != (tuple(weight.shape), weight.dtype):
        return False
    embed.rows = FileRowEmbedding(weight, file, where[0])
    embed.weight = None  # the portable copy: the head holds its kernel layout, the file the rows
    quant.release_freed_memory()
    return True


__all__ = [
    "INFERENCE_DTYPES",
    "CheckpointKind",
    "FileRowEmbedding",
    "describe_checkpoint",
    "load_checkpoint_tokenizer",
    "load_for_inference",
    "serve_embedding_from_file",
]
