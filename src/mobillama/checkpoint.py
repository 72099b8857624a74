"""Checkpoint directories: the one format everything downstream of training consumes.

A checkpoint is a Hugging Face-style directory::

    config.json              model_type "mobillama", the ModelConfig fields, dtype
    model.safetensors        weights; a shared FFN is stored once (model.ffns.0.*)
    generation_config.json   bos/eos ids
    tokenizer files          when the model was trained with one

Writes are atomic: everything goes into a temporary sibling directory that is renamed into place at the
end, so a crash or a full disk never leaves a half-written checkpoint under the final name. Reads check
every tensor's name and shape against the config and fail with one line naming the problem. Pickle
files (``*.bin``) are only ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mobillama.config import ModelConfig, get_preset, preset_name
from mobillama.errors import MobiLlamaError
from mobillama.model import MobiLlama
from mobillama.tensorfile import read_header

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "mobillama_tokenizer.json",
)


@contextlib.contextmanager
def atomic_directory(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; rename it to ``final`` only if the block succeeds.

    On any exception (including a full disk) the temporary directory is removed and ``final`` is left
    exactly as it was. With ``overwrite`` an existing ``final`` is replaced (old one removed only after
    the new one is in place).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise MobiLlamaError(f"output {final} already exists (choose another path or remove it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the final directory should be like any other
    try:
        yield tmp
        _fsync_dir(tmp)
        if final.exists():
            trash = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir() if path.is_dir() else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file that must hold an object (config, index, tokenizer files): one clear error otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MobiLlamaError(f"{path}: not valid JSON: {e}") from None
    except OSError as e:
        raise MobiLlamaError(f"{path}: not readable ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise MobiLlamaError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json(path: str | Path, data: dict) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def config_json(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of a checkpoint: readable by ModelConfig and by transformers (MobiLlamaConfig)."""
    from mobillama import __version__  # a real cycle: the package imports this module before it is set

    return {
        "model_type": "mobillama",
        "architectures": ["MobiLlamaForCausalLM"],
        **config.to_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "mobillama_version": __version__,
    }


def unique_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each stored once: a tied LM head is dropped (it is the embedding)."""
    out = {k: v.detach().contiguous() for k, v in state.items()}
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def save_checkpoint(
    model_or_state: torch.nn.Module | dict[str, torch.Tensor],
    config: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    extra_files: dict[str, dict] | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a checkpoint directory atomically and return its path.

    ``extra_files`` maps file names to JSON-serialisable dicts written beside the weights (training
    state summaries, lineage, quantization info).
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    state = unique_state_dict(state, config)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    weights_dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file({k: v.cpu() for k, v in state.items()}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(tmp / CONFIG_NAME, config_json(config, weights_dtype))
        write_json(
            tmp / GENERATION_CONFIG_NAME,
            {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id},
        )
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        for name, data in (extra_files or {}).items():
            write_json(tmp / name, data)
    return out_dir


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files found in ``src`` into ``dst``; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Every tensor name the config implies, with its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = MobiLlama(config)
    return {k: v.shape for k, v in unique_state_dict(model.state_dict(), config).items()}


def check_state_dict(
    state: dict[str, torch.Tensor],
    expected: ModelConfig | dict[str, torch.Size],
    source: str,
    *,
    dtypes: dict[str, torch.dtype] | None = None,
) -> None:
    """Raise one clear error for the first missing, unexpected or mis-shaped tensor.

    ``expected`` is a config (its tensors: :func:`expected_shapes`) or the name -> shape mapping itself,
    for state dicts a config alone does not describe (quantized checkpoints). Where ``dtypes`` names a
    tensor, its dtype must match in kind (floating or not) and, for integer tensors, exactly: a float
    may be stored in any precision, packed integer weights may not. A tensor of the wrong dtype is
    reported before the tensors missing beside it: a float table where packed weights are expected is
    the reason its scales are missing, and the more useful line.
    """
    if isinstance(expected, ModelConfig):
        expected = expected_shapes(expected)
    for k, want in (dtypes or {}).items():
        if k not in state:
            continue  # reported as missing below
        got = state[k].dtype
        if want.is_floating_point != got.is_floating_point or (not want.is_floating_point and want != got):
            raise MobiLlamaError(f"{source}: tensor {k!r} has dtype {got}, expected {want}")
    missing = [k for k in expected if k not in state]
    if missing:
        raise MobiLlamaError(
            f"{source}: missing tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    extra = [k for k in state if k not in expected]
    if extra:
        raise MobiLlamaError(
            f"{source}: unexpected tensor {extra[0]!r}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise MobiLlamaError(
                f"{source}: tensor {k!r} has shape {tuple(state[k].shape)}, expected {tuple(shape)}"
            )


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a truncated or corrupt file into a clear error."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MobiLlamaError(f"{path}: not a readable safetensors file ({e})") from None


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_ALL_SAFETENSORS_DTYPES = {
    **SAFETENSORS_DTYPES, "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}  # fmt: skip


class SafetensorsReader:
    """A safetensors file read one tensor at a time with plain file reads, never mapped.

    Why not ``safe_open``: its tensors are views of a mapping of the whole file, and every page a loader
    touches stays resident in this process until the mapping goes. Loading a quantized model then held
    the whole file beside the packed copy being built (the 0.5b int4 model peaked ~1.5x its steady
    size). Read tensor by tensor, a loader can pack and free each module before reading the next.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        entries, _ = read_header(path)
        self.entries: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        for name, e in entries.items():
            if e.dtype not in _ALL_SAFETENSORS_DTYPES:
                raise MobiLlamaError(
                    f"{path}: tensor {name!r} has dtype {e.dtype}, which this reader does not take"
                )
            self.entries[name] = (e.offset, e.shape, _ALL_SAFETENSORS_DTYPES[e.dtype])

    def shapes_and_dtypes(self) -> dict[str, torch.Tensor]:
        """Every tensor as a meta tensor: shape and dtype, for checks before anything is read."""
        return {
            k: torch.empty(shape, dtype=dtype, device="meta") for k, (_, shape, dtype) in self.entries.items()
        }

    def read(self, name: str) -> torch.Tensor:
        offset, shape, dtype = self.entries[name]
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(nbytes)
        with open(self.path, "rb") as f:
            f.seek(offset)
            if f.readinto(buffer) != nbytes:
                raise MobiLlamaError(f"{self.path}: tensor {name!r} is cut short (truncated file?)")
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def safetensors_location(path: str | Path, name: str) -> tuple[int, tuple[int, ...], torch.dtype] | None:
    """(byte offset in the file, shape, dtype) of tensor ``name`` in a safetensors file, from its header;
    None when the file or the tensor is not there or the file is damaged. Lets a reader take rows of one
    tensor with plain file reads, without mapping the file."""
    try:
        return SafetensorsReader(path).entries.get(name)
    except MobiLlamaError:
        return None


def read_pickle_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a ``pytorch_model*.bin`` with ``weights_only=True``: tensors only, never arbitrary objects."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # torch raises many types for bad pickles; all mean "not loadable"
        raise MobiLlamaError(
            f"{path}: not a loadable weights file ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MobiLlamaError(f"{path}: expected a mapping of tensor names to tensors")
    return state


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read and validate a project checkpoint directory: (config, state dict)."""
    path = Path(path)
    if not path.exists():
        raise MobiLlamaError(f"checkpoint not found: {path}")
    if not path.is_dir() or not (path / CONFIG_NAME).is_file():
        raise MobiLlamaError(f"{path} is not a checkpoint directory (no {CONFIG_NAME})")
    config = ModelConfig.load(path / CONFIG_NAME)
    raw = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    if raw.get("model_type") not in (None, "mobillama"):
        raise MobiLlamaError(
            f"{path} holds a {raw.get('model_type')!r} checkpoint; import it first with "
            f"'mobillama convert from-hf {path} OUT'"
        )
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise MobiLlamaError(f"{path}: no {WEIGHTS_NAME}")
    state = read_safetensors(weights)
    check_state_dict(state, config, str(weights))
    return config, state


def load_model(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """A :class:`~mobillama.model.MobiLlama` from a preset name (random weights) or a checkpoint directory."""
    if preset_name(path):
        model = MobiLlama(get_preset(str(path)))
    else:
        config, state = load_checkpoint(path)
        with torch.device("meta"):
            model = MobiLlama(config)
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()
