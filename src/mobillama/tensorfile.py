"""The header of a safetensors file, parsed and checked without PyTorch.

Shared by the torch loader (:class:`mobillama.checkpoint.SafetensorsReader`) and the lean runtime
(:mod:`mobillama.infer.lean`), which reads its weights with numpy in a process that never imports torch.
Every damage a header can carry (wrong length, not JSON, a tensor outside the file or of the wrong byte
count) is a one-line :class:`~mobillama.errors.MobiLlamaError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from mobillama.errors import MobiLlamaError

# bytes per element of each safetensors dtype this project reads
ITEMSIZE = {
    "BF16": 2,
    "F16": 2,
    "F32": 4,
    "F64": 8,
    "I8": 1,
    "U8": 1,
    "I16": 2,
    "U16": 2,
    "I32": 4,
    "I64": 8,
    "BOOL": 1,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: ``offset`` from the start of the file, ``nbytes`` long."""

    offset: int
    shape: tuple[int, ...]
    dtype: str  # the safetensors name: "BF16", "U8", ...
    nbytes: int


def read_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """(tensor entries by name, the ``__metadata__`` strings) of the safetensors file ``path``."""
    try:
        size = Path(path).stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise MobiLlamaError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise MobiLlamaError(f"{path}: not a readable safetensors file (header is not a mapping)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise MobiLlamaError(f"{path}: not a readable safetensors file (__metadata__ is not a mapping)")
    entries = {}
    for name, entry in header.items():
        try:
            itemsize = ITEMSIZE[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MobiLlamaError(f"{path}: tensor {name!r} has an unreadable header entry") from None
        nbytes = itemsize * math.prod(shape)
        if begin < 0 or end - begin != nbytes or 8 + n + end > size or any(d < 0 for d in shape):
            raise MobiLlamaError(f"{path}: tensor {name!r} lies outside the file (truncated?)")
        entries[name] = TensorEntry(8 + n + begin, shape, entry["dtype"], nbytes)
    return entries, metadata
