"""Import a Hugging Face Llama-format checkpoint (the original MobiLlama release or any plain Llama).

The original release (MBZUAI's MobiLlama on the Hugging Face Hub) is a Llama checkpoint with three traps, each handled here:

- ``config.json`` says ``num_key_value_heads: 4`` while the weights are full multi-head. Head counts are
  therefore read from the weight shapes (head size = hidden / num_attention_heads, kv heads = k_proj rows /
  head size) and a notice says when the field disagreed.
- Every layer carries its own ``model.layers.{i}.mlp.*`` copy of the one shared FFN (a full-state save).
  The copies are compared *bitwise* before one is kept (``ffn_sharing: all``). If they differ (the 1B
  "large base"), the model is imported as ``ffn_sharing: none`` with a notice naming the first differing
  tensor; ``collapse="layer:K"`` or ``"mean"`` explicitly builds a shared model from such a checkpoint.
- Some files hold ``self_attn.rotary_emb.inv_freq`` buffers: derived from the config, dropped.

RoPE scaling of the ``linear`` and ``llama3`` types (``rope_scaling`` in transformers 4.x files,
``rope_parameters`` in 5.x) becomes the config's ``rope_scaling``; other types are refused.

Weights come as one or several ``*.safetensors`` (with ``model.safetensors.index.json``) or
``pytorch_model*.bin`` (with ``pytorch_model.bin.index.json``); pickles are read only through
:func:`~mobillama.checkpoint.read_pickle_weights` (``weights_only=True``). Every problem is one
:class:`~mobillama.errors.MobiLlamaError` naming the file or key, raised before anything is written; the
output goes through :func:`~mobillama.checkpoint.save_checkpoint`, which writes atomically.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mobillama.checkpoint import (
    CONFIG_NAME,
    TOKENIZER_FILES,
    check_state_dict,
    load_checkpoint,
    read_json_object,
    read_pickle_weights,
    read_safetensors,
    save_checkpoint,
)
from mobillama.config import FFN_PROJS, ROPE_SCALING_KEYS, ModelConfig, ffn_weight_name, parse_dtype
from mobillama.errors import MobiLlamaError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Weight files of other frameworks: named in the error so the user knows why nothing was found.
UNSUPPORTED_WEIGHT_PATTERNS = ("*.gguf", "*.h5", "*.msgpack", "*.ckpt", "*.pt", "*.pth", "*.onnx", "*.npz")

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_INV_FREQ = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclass
class ImportReport:
    """What the import found and decided; printed by the CLI and stored as ``conversion.json``."""

    source: str
    source_format: str
    weight_files: list[str]
    ffn_sharing: str
    ffn_copies_identical: bool | None
    num_key_value_heads: int
    notices: list[str] = field(default_factory=list)
    tokenizer_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def import_hf(
    src: str | Path,
    out: str | Path,
    *,
    collapse: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> ImportReport:
    """Convert the Llama-format checkpoint ``src`` into a project checkpoint at ``out``.

    ``collapse`` ("layer:K" or "mean") turns per-layer FFNs that differ into one shared FFN; ``dtype``
    ("float32", "bfloat16", "float16") casts the weights, default keeps the source dtype.
    """
    src, out = Path(src), Path(out)
    collapse_mode = _parse_collapse(collapse)
    cast = parse_dtype(dtype) if dtype is not None else None
    if out.exists() and not overwrite:
        raise MobiLlamaError(f"output {out} already exists (choose another path or remove it)")
    if out.resolve() == src.resolve():
        raise MobiLlamaError(f"output {out} is the source directory; choose another path")
    raw = _read_config(src)

    if raw.get("model_type") == "mobillama":
        config, state = load_checkpoint(src)
        report = ImportReport(
            source=str(src),
            source_format="mobillama",
            weight_files=["model.safetensors"],
            ffn_sharing=config.ffn_sharing,
            ffn_copies_identical=None,
            num_key_value_heads=config.num_key_value_heads,
        )
        report.notices.append(f"{src} is already a mobillama checkpoint: copied as is")
        if collapse_mode is not None:
            report.notices.append("--collapse ignored: it applies to per-layer Llama FFNs only")
    else:
        state, source_format, files = _read_weights(src)
        config, state, report = _to_project(raw, state, src, collapse_mode)
        report.source_format, report.weight_files = source_format, files
    report.tokenizer_files = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not report.tokenizer_files:
        report.notices.append(f"no tokenizer files in {src}: the checkpoint has weights only")
    save_checkpoint(
        state,
        config,
        out,
        tokenizer_dir=src,
        extra_files={"conversion.json": report.to_dict()},
        overwrite=overwrite,
        dtype=cast,
    )
    return report


# --- reading -------------------------------------------------------------------------------------------


def _parse_collapse(collapse: str | None) -> tuple[str, int] | None:
    if collapse is None:
        return None
    if collapse == "mean":
        return ("mean", -1)
    head, _, k = collapse.partition(":")
    if head == "layer" and k.isdigit():
        return ("layer", int(k))
    raise MobiLlamaError(f"--collapse must be 'layer:K' (K a layer index) or 'mean', got {collapse!r}")


def _read_config(src: Path) -> dict[str, Any]:
    if not src.exists():
        raise MobiLlamaError(f"source not found: {src}")
    if not src.is_dir():
        raise MobiLlamaError(f"{src} is not a checkpoint directory")
    path = src / CONFIG_NAME
    if not path.is_file():
        raise MobiLlamaError(f"{src} is not a checkpoint directory (no {CONFIG_NAME})")
    raw = read_json_object(path)
    model_type = raw.get("model_type")
    if model_type not in ("llama", "mobillama"):
        raise MobiLlamaError(
            f"{path}: model_type {model_type!r} is not supported (expected 'llama', as in the MobiLlama "
            "release and plain Llama checkpoints, or 'mobillama')"
        )
    return raw


def _read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of an index file: tensor name -> shard file name (in the same directory)."""
    weight_map = read_json_object(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise MobiLlamaError(f"{path}: missing or empty 'weight_map'")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise MobiLlamaError(f"{path}: weight_map[{key!r}] must be a file name in the same directory")
    return weight_map


def _read_weights(src: Path) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """All tensors of the checkpoint, whichever of the supported layouts it uses (safetensors first)."""
    for index_name, single, pattern, fmt, reader in (
        (SAFETENSORS_INDEX, "model.safetensors", "model*.safetensors", "safetensors", read_safetensors),
        (PICKLE_INDEX, "pytorch_model.bin", "pytorch_model*.bin", "pytorch-bin", read_pickle_weights),
    ):
        index_path = src / index_name
        if index_path.is_file():
            weight_map = _read_index(index_path)
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (src / name).is_file():
                    raise MobiLlamaError(f"{index_path}: shard {name!r} not found in {src}")
            state = _merge_shards(src, files, reader)
            for key, shard in weight_map.items():
                if key not in state:
                    raise MobiLlamaError(f"{src / shard}: tensor {key!r} listed in {index_name} is missing")
            unlisted = sorted(k for k in state if k not in weight_map)
            if unlisted:
                raise MobiLlamaError(
                    f"{index_path}: tensor {unlisted[0]!r} is in a shard but not in the index"
                )
            return state, f"{fmt} (sharded)", files
        # Without an index: the single file if present (an adapter_model.safetensors beside it is not the
        # model), else every file of the usual shard name pattern.
        files = [single] if (src / single).is_file() else sorted(p.name for p in src.glob(pattern))
        if files:
            return _merge_shards(src, files, reader), fmt, files
    others = sorted(p.name for pat in UNSUPPORTED_WEIGHT_PATTERNS for p in src.glob(pat))
    raise MobiLlamaError(
        f"{src}: no weights found (expected model*.safetensors or pytorch_model*.bin"
        + (f"; found unsupported {', '.join(others)})" if others else ")")
    )


def _merge_shards(src: Path, files: list[str], reader) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name in tqdm(files, desc="reading shards", unit="file", disable=len(files) < 2 or None):
        part = reader(src / name)
        for key, tensor in part.items():
            if key in state:
                raise MobiLlamaError(f"{src}: tensor {key!r} appears in both {origin[key]} and {name}")
            state[key], origin[key] = tensor, name
    return state


# --- config and tensors --------------------------------------------------------------------------------


def _field(raw: dict[str, Any], name: str, kind: type | tuple[type, ...], source: str, default: Any = None):
    """One config field with its type checked (bool is not a number); ``default`` None means required."""
    if name not in raw or raw[name] is None:
        if default is None:
            raise MobiLlamaError(f"{source}: missing config field {name!r}")
        return default
    value = raw[name]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else "number"
        raise MobiLlamaError(f"{source}: config field {name!r} must be {want}, got {value!r}")
    return value


def _rope(raw: dict[str, Any], source: str, max_positions: int) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the RoPE scaling (None: plain RoPE) of a Llama config.json.

    transformers 4.x files keep ``rope_theta`` at the top level and the scaling in ``rope_scaling``
    (``rope_type``, or ``type`` in older files); 5.x files hold both in ``rope_parameters``. The
    ``linear`` and ``llama3`` types are imported with their keys (a llama3 mapping without
    ``original_max_position_embeddings`` means max_position_embeddings, as in transformers); any other
    type (yarn, dynamic, longrope, ...) is refused.
    """
    theta = float(_field(raw, "rope_theta", (int, float), source, default=10000.0))
    name = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    params = raw.get(name) or {}
    if not isinstance(params, dict):
        raise MobiLlamaError(f"{source}: config field {name!r} must be a mapping, got {params!r}")
    if "rope_theta" in params:
        theta = float(_field(params, "rope_theta", (int, float), source))
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise MobiLlamaError(
            f"{source}: partial_rotary_factor {partial!r} is not supported (full rotary only)"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_SCALING_KEYS:
        raise MobiLlamaError(
            f"{source}: RoPE scaling {rope_type!r} is not supported (only plain RoPE, "
            f"{' and '.join(repr(k) for k in ROPE_SCALING_KEYS)})"
        )
    scaling: dict[str, Any] = {"rope_type": rope_type}
    for key in ROPE_SCALING_KEYS[rope_type]:
        value = params.get(key)
        if key == "original_max_position_embeddings":  # transformers: the top-level field wins, then ours
            value = raw.get(key, value if value is not None else max_positions)
        if value is not None:  # a missing key is named by ModelConfig's check
            scaling[key] = value
    return theta, scaling


def _special_id(raw: dict[str, Any], name: str, source: str, default: int) -> int:
    value = raw.get(name)
    if isinstance(value, list):  # HF allows several EOS ids; the project keeps the first
        value = value[0] if value else None
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise MobiLlamaError(f"{source}: config field {name!r} must be int, got {value!r}")
    return value


def _to_project(
    raw: dict[str, Any],
    state: dict[str, torch.Tensor],
    src: Path,
    collapse: tuple[str, int] | None,
    *,
    source: str | None = None,
    collapse_hint: bool = True,
) -> tuple[ModelConfig, dict[str, torch.Tensor], ImportReport]:
    """Llama config + Llama-named tensors -> project config and state (shared by the HF and GGUF importers).

    ``source`` names where the config came from in errors (default: SRC/config.json); ``collapse_hint``
    says whether the notice about differing FFNs mentions ``--collapse`` (from-hf's option).
    """
    source = source or str(src / CONFIG_NAME)
    notices: list[str] = []
    vocab = _field(raw, "vocab_size", int, source)
    hidden = _field(raw, "hidden_size", int, source)
    inter = _field(raw, "intermediate_size", int, source)
    n_layers = _field(raw, "num_hidden_layers", int, source)
    n_heads = _field(raw, "num_attention_heads", int, source)
    field_kv = _field(raw, "num_key_value_heads", int, source, default=n_heads)
    for flag in ("attention_bias", "mlp_bias"):
        if _field(raw, flag, bool, source, default=False):
            raise MobiLlamaError(f"{source}: {flag} is true; biases are not supported")
    act = _field(raw, "hidden_act", str, source, default="silu")
    if act != "silu":
        raise MobiLlamaError(f"{source}: hidden_act {act!r} is not supported (the FFN is SwiGLU: 'silu')")
    if min(vocab, hidden, inter, n_layers, n_heads) <= 0 or hidden % n_heads:
        raise MobiLlamaError(
            f"{source}: sizes must be positive and hidden_size {hidden} divisible by "
            f"num_attention_heads {n_heads}"
        )
    head_dim = hidden // n_heads
    if _field(raw, "head_dim", int, source, default=head_dim) != head_dim:
        raise MobiLlamaError(
            f"{source}: head_dim {raw['head_dim']} differs from hidden_size / num_attention_heads = {head_dim}"
        )

    inv_freq = [k for k in state if _INV_FREQ.fullmatch(k)]
    if inv_freq:  # buffers recomputed from rope_theta at run time: nothing to keep
        state = {k: v for k, v in state.items() if k not in inv_freq}
        notices.append(f"dropped {len(inv_freq)} rotary_emb.inv_freq buffers (derived from rope_theta)")

    # Head counts from the weights, not the field (the release's field is wrong).
    k_key = "model.layers.0.self_attn.k_proj.weight"
    if k_key not in state:
        raise MobiLlamaError(f"{src}: missing tensor {k_key!r}")
    k_rows = state[k_key].shape[0] if state[k_key].dim() == 2 else 0
    if not k_rows or k_rows % head_dim or n_heads % (k_rows // head_dim):
        raise MobiLlamaError(
            f"{src}: tensor {k_key!r} has shape {tuple(state[k_key].shape)}, which fits no number of "
            f"key/value heads of size {head_dim}"
        )
    n_kv = k_rows // head_dim
    if field_kv != n_kv:
        notices.append(
            f"config says num_key_value_heads {field_kv}, but {k_key} has {k_rows} rows = {n_kv} heads of "
            f"size {head_dim}: using {n_kv} (the weights win)"
        )

    tie = _field(raw, "tie_word_embeddings", bool, source, default=False)
    if tie and "lm_head.weight" in state:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}

    # Split layer tensors into the layer's own ones and its FFN; anything unknown is an error.
    ffns: list[dict[str, torch.Tensor]] = [{} for _ in range(n_layers)]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _LAYER_KEY.fullmatch(key)
        if m and int(m.group(1)) < n_layers and m.group(2).startswith("mlp."):
            part = m.group(2).removeprefix("mlp.").removesuffix(".weight")
            if part not in FFN_PROJS or not m.group(2).endswith(".weight"):
                raise MobiLlamaError(f"{src}: unexpected tensor {key!r}")
            ffns[int(m.group(1))][part] = tensor
        else:
            out[key] = tensor  # validated against the config's expected names below
    ffn_shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    for i, ffn in enumerate(ffns):
        for part, shape in ffn_shapes.items():
            key = f"model.layers.{i}.mlp.{part}.weight"
            if part not in ffn:
                raise MobiLlamaError(f"{src}: missing tensor {key!r}")
            if tuple(ffn[part].shape) != shape:
                raise MobiLlamaError(
                    f"{src}: tensor {key!r} has shape {tuple(ffn[part].shape)}, expected {shape}"
                )

    identical, first_diff = _ffn_copies_identical(ffns)
    if identical:
        sharing, kept = "all", [ffns[0]]
        if collapse is not None:
            notices.append("--collapse had nothing to do: the FFN copies are already identical")
    elif collapse is None:
        sharing, kept = "none", ffns
        notices.append(
            f"the {n_layers} per-layer FFNs are not identical (first difference: {first_diff}): imported "
            "as ffn_sharing 'none'"
            + ("; use --collapse layer:K or --collapse mean for a shared model" if collapse_hint else "")
        )
    else:
        sharing, kept = "all", [_collapse(ffns, collapse, first_diff, notices)]
    for g, ffn in enumerate(kept):
        for part in FFN_PROJS:
            out[ffn_weight_name(g, part)] = ffn[part]

    max_positions = _field(raw, "max_position_embeddings", int, source, default=2048)
    rope_theta, rope_scaling = _rope(raw, source, max_positions)
    if rope_scaling is not None:
        details = ", ".join(f"{k} {v}" for k, v in rope_scaling.items() if k != "rope_type")
        notices.append(f"RoPE scaling {rope_scaling['rope_type']!r} ({details})")
    config_values = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "max_position_embeddings": max_positions,
        # transformers' LlamaConfig default eps is 1e-6: a file without the field means that.
        "rms_norm_eps": float(_field(raw, "rms_norm_eps", (int, float), source, default=1e-6)),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": tie,
        "ffn_sharing": sharing,
        "bos_token_id": _special_id(raw, "bos_token_id", source, 1),
        "eos_token_id": _special_id(raw, "eos_token_id", source, 2),
    }
    config = ModelConfig.from_dict(config_values, source=source)
    check_state_dict(out, config, str(src))
    report = ImportReport(
        source=str(src),
        source_format="",
        weight_files=[],
        ffn_sharing=sharing,
        ffn_copies_identical=identical,
        num_key_value_heads=n_kv,
        notices=notices,
    )
    return config, out, report


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (unlike ``torch.equal``, NaNs and -0.0 compare by their bits)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def _ffn_copies_identical(ffns: list[dict[str, torch.Tensor]]) -> tuple[bool, str | None]:
    """Whether every layer's FFN equals layer 0's, bit for bit; else the first differing key."""
    for i in range(1, len(ffns)):
        for part in FFN_PROJS:
            if not _bitwise_equal(ffns[i][part], ffns[0][part]):
                return (
                    False,
                    f"model.layers.{i}.mlp.{part}.weight differs from model.layers.0.mlp.{part}.weight",
                )
    return True, None


def _collapse(
    ffns: list[dict[str, torch.Tensor]], collapse: tuple[str, int], first_diff: str | None, notices: list[str]
) -> dict[str, torch.Tensor]:
    mode, k = collapse
    if mode == "layer":
        if k >= len(ffns):
            raise MobiLlamaError(f"--collapse layer:{k}: the model has layers 0..{len(ffns) - 1}")
        notices.append(
            f"the per-layer FFNs differ ({first_diff}); collapsed to layer {k}'s FFN as requested: "
            "the shared model is a new model and will not reproduce the source's outputs"
        )
        return dict(ffns[k])
    notices.append(
        f"the per-layer FFNs differ ({first_diff}); collapsed to their mean as requested: "
        "the shared model is a new model and will not reproduce the source's outputs"
    )
    return {
        part: torch.stack([f[part].float() for f in ffns]).mean(0).to(ffns[0][part].dtype)
        for part in FFN_PROJS
    }
