"""Import a llama.cpp GGUF file of the ``llama`` architecture (``mobillama convert from-gguf``).

GGUF is how most small pretrained Llama-family models are shared for CPUs, and the one real pretrained
model that installs offline here (SmolLM2-135M-Instruct) comes as GGUF only. The file is read with the
``gguf`` package (the reader llama.cpp itself ships):

- weights of every type the package can dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants, ...)
  become float32; q/k rows are put back from GGML's interleaved RoPE layout to Hugging Face's
  rotate-half layout (:func:`~mobillama.convert.to_gguf.unpermute_from_gguf`); a file without
  ``output.weight`` has tied embeddings;
- ``llama.*`` metadata becomes the model config (grouped-query heads, rope theta, RMS eps, context);
  linear RoPE scaling (``llama.rope.scaling.factor``, or the older ``llama.rope.scale_linear``, with
  ``llama.rope.scaling.type`` "linear", "none" or absent: llama.cpp applies the factor for all three)
  becomes ``rope_scaling: {"rope_type": "linear", ...}``. A ``rope_freqs.weight`` tensor (llama.cpp's
  per-frequency divisors, how its converter stores Llama 3 "llama3" scaling) becomes ``rope_scaling:
  {"rope_type": "llama3", ...}``: the factor is the largest divisor, and the low/high frequency factors
  are solved from the blended frequencies (linear in 1 / wavelength) for the file's
  ``llama.rope.scaling.original_context_length`` (8192, Llama 3's, when absent: the frequencies do not
  depend on that choice). The recovered parameters must reproduce every frequency llama.cpp would use
  (relative error below 1e-5) or the file is refused. Other scaling types (yarn, ...) are refused;
- ``tokenizer.ggml.*`` becomes a Hugging Face tokenizer that tokenizes exactly as llama.cpp does
  (:mod:`mobillama.convert.gguf_vocab`), with the chat template, special tokens and add-BOS/EOS flags.

The rest (per-layer FFNs checked for identity, config validation, atomic write) is the Hugging Face
importer's, so a GGUF file and the same model in Hugging Face format give the same checkpoint.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import gguf
import gguf.quants
import numpy as np
import torch
from tqdm import tqdm

from mobillama.checkpoint import GENERATION_CONFIG_NAME, read_json_object, save_checkpoint, write_json
from mobillama.config import parse_dtype
from mobillama.convert.from_hf import ImportReport, _to_project
from mobillama.convert.gguf_vocab import (
    ADD_BOS_BY_DEFAULT,
    backend_from_gguf_bpe,
    spm_model_from_gguf,
)
from mobillama.convert.to_gguf import unpermute_from_gguf
from mobillama.convert.to_llama import llama_tensor_names
from mobillama.errors import MobiLlamaError
from mobillama.model import rope_inv_freq
from mobillama.tokenizer import Tokenizer, sentencepiece_to_hf

ARCH = "llama"
GGUF_MAGIC = b"GGUF"


class GGUFFile:
    """A validated, memory-mapped GGUF file with typed metadata access (errors name the file and key)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise MobiLlamaError(f"GGUF file not found: {self.path}")
        if not self.path.is_file():
            raise MobiLlamaError(f"{self.path} is not a file (expected a .gguf file)")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise MobiLlamaError(f"{self.path}: not a GGUF file (it does not start with 'GGUF')")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # struct/numpy/ValueError for cut or corrupt headers
            raise MobiLlamaError(
                f"{self.path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})"
            ) from None
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise MobiLlamaError(
                    f"{self.path}: truncated: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes}, "
                    f"the file has {size}"
                )

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise MobiLlamaError(f"{self.path}: unreadable metadata {key!r} ({e})") from None

    def require(self, key: str, kind: type | tuple[type, ...]) -> Any:
        value = self.get(key)
        if value is None:
            raise MobiLlamaError(f"{self.path}: missing GGUF metadata {key!r}")
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise MobiLlamaError(f"{self.path}: GGUF metadata {key!r} has unexpected value {value!r:.80}")
        return value


def import_gguf(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    source_name: str | None = None,
) -> ImportReport:
    """Convert the ``llama``-architecture GGUF file ``src`` into a project checkpoint at ``out``.

    ``dtype`` ("float32", "bfloat16", "float16") casts the weights; the default float32 holds every
    dequantized GGUF value exactly. ``source_name`` is what the lineage records as the source (default:
    the file's path).
    """
    src, out = Path(src), Path(out)
    cast = parse_dtype(dtype) if dtype is not None else None
    if out.exists() and not overwrite:
        raise MobiLlamaError(f"output {out} already exists (choose another path or remove it)")
    gf = GGUFFile(src)
    raw = hf_config_from_gguf(gf)
    with tempfile.TemporaryDirectory(prefix="mobillama-gguf-tok-") as tok_dir:
        notices: list[str] = []
        # The tokenizer first: an unsupported vocabulary fails before minutes of dequantization.
        vocab = write_tokenizer_from_gguf(gf, Path(tok_dir), notices)
        state = llama_state_from_gguf(gf, raw)
        config, state, report = _to_project(raw, state, src, None, source=str(src), collapse_hint=False)
        report.source, report.source_format = source_name or str(src), "gguf"
        report.weight_files = [src.name]
        types = sorted({t.tensor_type.name for t in gf.reader.tensors})
        report.notices += [
            *notices,
            f"dequantized {len(gf.reader.tensors)} tensors ({', '.join(types)}) to float32",
        ]
        extra: dict[str, dict] = {}
        if vocab is not None:
            report.tokenizer_files = sorted(os.listdir(tok_dir))
            stop = [config.eos_token_id, *[i for i in vocab["stop_ids"] if i != config.eos_token_id]]
            extra[GENERATION_CONFIG_NAME] = {
                "bos_token_id": config.bos_token_id,
                "eos_token_id": stop if len(stop) > 1 else stop[0],
            }
        extra["conversion.json"] = report.to_dict()
        save_checkpoint(
            state,
            config,
            out,
            tokenizer_dir=tok_dir if vocab is not None else None,
            extra_files=extra,
            overwrite=overwrite,
            dtype=cast,
        )
    return report


# --- config ----------------------------------------------------------------------------------------------


def _one_per_model(gf: GGUFFile, key: str) -> int:
    """An int field that some files store per layer (an array): all layers must agree."""
    value = gf.get(key)
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise MobiLlamaError(f"{gf.path}: {key} differs between layers, which is not supported")
        value = value[0]
    if value is None:
        raise MobiLlamaError(f"{gf.path}: missing GGUF metadata {key!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise MobiLlamaError(f"{gf.path}: GGUF metadata {key!r} has unexpected value {value!r:.80}")
    return value


def _float32_value(value: float) -> float:
    """GGUF stores floats as float32: 1e-5 arrives as 9.99999974e-06; keep the decimal it was written as."""
    return float(f"{float(value):.7g}")


def _rope_scaling(gf: GGUFFile) -> dict[str, Any] | None:
    """The file's RoPE scaling as a Hugging Face ``rope_scaling`` mapping: linear or None (see the module
    docstring for what llama.cpp reads and what is refused)."""
    kind = gf.get(f"{ARCH}.rope.scaling.type")
    if kind not in (None, "none", "linear"):
        raise MobiLlamaError(
            f"{gf.path}: RoPE scaling {kind!r} is not supported (only plain RoPE and 'linear')"
        )
    freqs = next((t for t in gf.reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:
        theta = float(gf.get(f"{ARCH}.rope.freq_base", 10000.0))
        original = gf.get(f"{ARCH}.rope.scaling.original_context_length") or LLAMA3_ORIGINAL_CONTEXT
        try:
            divisors = np.array(
                gguf.quants.dequantize(freqs.data, freqs.tensor_type), dtype=np.float64
            ).ravel()
        except NotImplementedError:
            raise MobiLlamaError(f"{gf.path}: tensor {ROPE_FREQS!r} has an unreadable type") from None
        return llama3_scaling_from_divisors(divisors, theta, int(original), str(gf.path))
    factor = gf.get(f"{ARCH}.rope.scaling.factor")
    if factor is None:  # the key's older name, which llama.cpp still reads
        factor = gf.get(f"{ARCH}.rope.scale_linear")
    if factor is None or factor in (0, 1):  # llama.cpp: 0 (unset) and 1 both mean no scaling
        return None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise MobiLlamaError(
            f"{gf.path}: GGUF metadata RoPE scaling factor has unexpected value {factor!r:.80}"
        )
    return {"rope_type": "linear", "factor": _float32_value(factor)}


ROPE_FREQS = "rope_freqs.weight"
LLAMA3_ORIGINAL_CONTEXT = 8192  # Llama 3's pre-extension context, assumed where the file does not say


def llama3_scaling_from_divisors(
    divisors: np.ndarray, theta: float, original_context: int, source: str
) -> dict[str, Any] | None:
    """The ``llama3`` rope_scaling whose frequencies are ``plain / divisors`` (llama.cpp's rope_freqs).

    In the llama3 rule a frequency is kept (divisor 1), slowed by ``factor`` (divisor = factor), or
    blended; a blended one's weight on the kept frequency is ``(context / wavelength - low) / (high - low)``,
    a straight line in 1 / wavelength, so two or more blended frequencies determine low and high. The
    result is checked by recomputing every frequency with :func:`mobillama.model.rope_inv_freq`.
    """
    head_dim = 2 * divisors.size
    if divisors.size == 0 or not np.all(np.isfinite(divisors)) or np.any(divisors <= 0):
        raise MobiLlamaError(f"{source}: tensor {ROPE_FREQS!r} holds non-positive or non-finite divisors")
    factor = float(divisors.max())
    if np.allclose(divisors, 1.0, rtol=1e-6):
        return None
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    blended = ~np.isclose(divisors, 1.0, rtol=1e-6) & ~np.isclose(divisors, factor, rtol=1e-6)
    refused = MobiLlamaError(
        f"{source}: the RoPE frequency divisors in {ROPE_FREQS!r} do not follow Llama 3's 'llama3' rule "
        "(or fix too few of its parameters); import the Hugging Face checkpoint with convert from-hf"
    )
    if blended.sum() < 2:
        raise refused
    keep = (1.0 / divisors[blended] - 1.0 / factor) / (1.0 - 1.0 / factor)
    slope, intercept = np.polyfit(inv[blended] / (2 * math.pi), keep, 1)  # keep = slope / wavelength + b
    span = original_context / slope  # high - low
    low = -intercept * span
    scaling = {
        "rope_type": "llama3",
        "factor": _float32_value(factor),
        "low_freq_factor": float(f"{low:.6g}"),
        "high_freq_factor": float(f"{low + span:.6g}"),
        "original_max_position_embeddings": original_context,
    }
    want = torch.from_numpy(inv / divisors).float()
    got = rope_inv_freq(head_dim, theta, scaling).double()
    if not torch.all(((got - want.double()).abs() / want.double()) < 1e-5):
        raise refused
    return scaling


def hf_config_from_gguf(gf: GGUFFile) -> dict[str, Any]:
    """The ``llama.*`` metadata as a Hugging Face Llama ``config.json`` mapping (checked)."""
    arch = gf.get("general.architecture")
    if arch != ARCH:
        raise MobiLlamaError(
            f"{gf.path}: architecture {arch!r} is not supported (only {ARCH!r}: Llama, SmolLM, TinyLlama, "
            "Mistral-style dense models)"
        )
    if (gf.get(f"{ARCH}.expert_count") or 0) > 0:
        raise MobiLlamaError(f"{gf.path}: mixture-of-experts models are not supported")
    rope_scaling = _rope_scaling(gf)
    hidden = gf.require(f"{ARCH}.embedding_length", int)
    n_heads = _one_per_model(gf, f"{ARCH}.attention.head_count")
    has_kv = gf.get(f"{ARCH}.attention.head_count_kv") is not None
    n_kv = _one_per_model(gf, f"{ARCH}.attention.head_count_kv") if has_kv else n_heads
    if n_heads <= 0 or hidden % n_heads:
        raise MobiLlamaError(f"{gf.path}: embedding_length {hidden} is not divisible by head_count {n_heads}")
    head_dim = hidden // n_heads
    for key in (
        f"{ARCH}.rope.dimension_count",
        f"{ARCH}.attention.key_length",
        f"{ARCH}.attention.value_length",
    ):
        value = gf.get(key)
        if value is not None and value != head_dim:
            raise MobiLlamaError(
                f"{gf.path}: {key} is {value}, but the head size is {head_dim}; partial rotary or "
                "differently sized heads are not supported"
            )
    embd = next((t for t in gf.reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise MobiLlamaError(f"{gf.path}: missing tensor 'token_embd.weight'")
    vocab = gf.get(f"{ARCH}.vocab_size") or int(embd.shape[-1])
    names = {t.name for t in gf.reader.tensors}
    raw: dict[str, Any] = {
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": _one_per_model(gf, f"{ARCH}.feed_forward_length"),
        "num_hidden_layers": gf.require(f"{ARCH}.block_count", int),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "max_position_embeddings": gf.require(f"{ARCH}.context_length", int),
        "rms_norm_eps": _float32_value(gf.require(f"{ARCH}.attention.layer_norm_rms_epsilon", (int, float))),
        "rope_theta": _float32_value(gf.get(f"{ARCH}.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": "output.weight" not in names,
    }
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = gf.get(f"tokenizer.ggml.{name}")
        if value is not None:
            raw[key] = int(value)
    return raw


# --- tensors ---------------------------------------------------------------------------------------------


def llama_state_from_gguf(gf: GGUFFile, raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor, dequantized to float32, under Hugging Face Llama names with q/k un-permuted."""
    n_layers = raw["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    llama_name = {name_map.get_name(k, try_suffixes=(".weight",)): k for k in llama_tensor_names(n_layers)}
    state: dict[str, torch.Tensor] = {}
    for t in tqdm(gf.reader.tensors, desc="dequantizing", unit="tensor", disable=None):
        if t.name == ROPE_FREQS:  # read into the config's rope_scaling (hf_config_from_gguf)
            continue
        if t.name not in llama_name:
            raise MobiLlamaError(f"{gf.path}: unexpected tensor {t.name!r} for a 'llama' model")
        shape = [int(d) for d in reversed(t.shape.tolist())]  # GGUF lists dimensions innermost first
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise MobiLlamaError(
                f"{gf.path}: tensor {t.name!r} has type {t.tensor_type.name}, which the gguf package "
                "cannot dequantize"
            ) from None
        w = torch.from_numpy(np.array(array, dtype=np.float32)).reshape(shape)  # a writable copy
        key = llama_name[t.name]
        if key.endswith("self_attn.q_proj.weight"):
            w = unpermute_from_gguf(w, raw["num_attention_heads"])
        elif key.endswith("self_attn.k_proj.weight"):
            w = unpermute_from_gguf(w, raw["num_key_value_heads"])
        state[key] = w
    return state


# --- tokenizer -------------------------------------------------------------------------------------------


def write_tokenizer_from_gguf(gf: GGUFFile, out_dir: Path, notices: list[str]) -> dict[str, Any] | None:
    """Write the file's tokenizer as Hugging Face tokenizer files into ``out_dir``.

    Returns what the checkpoint needs beside the files (the ids generation stops at), or None, with a
    notice, when the file carries no vocabulary.
    """
    # transformers (~2.5 s) only here: reading GGUF weights back (to_gguf's checks) does not need it
    from transformers import PreTrainedTokenizerFast

    model = gf.get("tokenizer.ggml.model")
    if model in (None, "no_vocab"):
        notices.append(f"{gf.path} has no vocabulary (tokenizer.ggml.model {model!r}): weights only")
        return None
    tokens = gf.require("tokenizer.ggml.tokens", list)
    n = len(tokens)
    types = gf.get("tokenizer.ggml.token_type") or [1] * n
    if len(types) != n:
        raise MobiLlamaError(f"{gf.path}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")

    def special_id(name: str) -> int | None:
        value = gf.get(f"tokenizer.ggml.{name}_token_id")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
            raise MobiLlamaError(f"{gf.path}: tokenizer.ggml.{name}_token_id {value!r} is not a token id")
        return value

    ids = {name: special_id(name) for name in ("bos", "eos", "unknown", "padding", "eot")}
    text = {name: (tokens[i] if i is not None else None) for name, i in ids.items()}
    pre = None
    if model == "gpt2":
        pre = gf.get("tokenizer.ggml.pre")
        if pre is None:
            pre = "default"
            notices.append(f"{gf.path} names no pre-tokenizer: llama.cpp's 'default' split is used")
        add_bos = bool(gf.get("tokenizer.ggml.add_bos_token", pre in ADD_BOS_BY_DEFAULT))
        add_eos = bool(gf.get("tokenizer.ggml.add_eos_token", False))
        merges = gf.require("tokenizer.ggml.merges", list)
        backend = backend_from_gguf_bpe(
            tokens, types, merges, pre, bos=text["bos"], eos=text["eos"], add_bos=add_bos, add_eos=add_eos
        )
        specials = {
            "bos_token": text["bos"],
            "eos_token": text["eos"],
            "unk_token": text["unknown"],
            "pad_token": text["padding"],
        }
        hf = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            clean_up_tokenization_spaces=False,
            **{k: v for k, v in specials.items() if v is not None},
        )
        tok = Tokenizer(hf, origin=str(gf.path))
    elif model == "llama":
        add_bos = bool(gf.get("tokenizer.ggml.add_bos_token", True))
        add_eos = bool(gf.get("tokenizer.ggml.add_eos_token", False))
        scores = gf.get("tokenizer.ggml.scores") or [0.0] * n
        sp_bytes = spm_model_from_gguf(
            tokens,
            scores,
            types,
            unk=ids["unknown"],
            bos=ids["bos"],
            eos=ids["eos"],
            pad=ids["padding"],
            add_space_prefix=bool(gf.get("tokenizer.ggml.add_space_prefix", True)),
        )
        tok = Tokenizer(sentencepiece_to_hf(sp_bytes, str(gf.path)), origin=str(gf.path), sp_model=sp_bytes)
        if text["padding"] is not None:
            tok.hf.pad_token = text["padding"]
    else:
        raise MobiLlamaError(
            f"{gf.path}: tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' or "
            "SentencePiece 'llama')"
        )
    template = gf.get("tokenizer.chat_template")
    if template is not None:
        tok.hf.chat_template = template
    elif model == "gpt2":
        notices.append(f"{gf.path} has no chat template: chat uses the MobiLlama-Chat format")
    tok.save_files(out_dir, metadata={"gguf": {"model": model, "pre": pre, "source": gf.path.name}})
    # The add-BOS/EOS flags in the form transformers and this project read them.
    config_path = out_dir / "tokenizer_config.json"
    tok_config = read_json_object(config_path)
    tok_config.update({"add_bos_token": add_bos, "add_eos_token": add_eos})
    write_json(config_path, tok_config)
    stop_ids = [i for i in (ids["eos"], ids["eot"]) if i is not None]
    return {"stop_ids": list(dict.fromkeys(stop_ids))}
