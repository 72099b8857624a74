"""Export a project checkpoint to GGUF (llama.cpp, ollama) with the ``gguf`` package.

The file uses llama.cpp's ``llama`` architecture: the metadata keys and tensor names its loader expects
(``token_embd.weight``, ``blk.N.attn_q.weight``, ..., ``blk.N.ffn_gate.weight``, ``output_norm.weight``,
``output.weight``; the mapping comes from ``gguf.TensorNameMap``, not from a hand-written table).

GGUF cannot alias one tensor under several names, so the shared FFN is written once per layer: the file
is as large as a dedicated-FFN model of the same shape and llama.cpp decodes it at that model's speed.
Quantized types (q8_0, q4_0) are produced by ``gguf.quants.quantize``; each distinct FFN is quantized
once and the result reused for every layer. 1-D tensors (norms) stay float32, as llama.cpp's own converter
does, and a matrix whose rows are not a multiple of the 32-value block falls back to f16 (reported).

Linear RoPE scaling is written as llama.cpp's ``llama.rope.scaling.type`` "linear" and
``llama.rope.scaling.factor``; Llama 3 ("llama3") scaling as llama.cpp's own converter writes it, a
``rope_freqs.weight`` tensor of per-frequency divisors (F32), plus ``llama.rope.scaling.original_context_length``
so that ``convert from-gguf`` recovers the four parameters exactly.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import gguf.quants
import numpy as np
import torch
from tqdm import tqdm

from mobillama.checkpoint import load_checkpoint, read_json_object
from mobillama.config import ModelConfig
from mobillama.convert.gguf_vocab import gguf_pre_tokenizer_name
from mobillama.convert.to_llama import llama_state_dict
from mobillama.errors import MobiLlamaError
from mobillama.model import rope_inv_freq

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")


@dataclass
class GGUFReport:
    """What was written: printed by the CLI."""

    path: str
    type: str
    num_tensors: int
    tensor_types: dict[str, int]
    vocab: str
    file_bytes: int = 0
    notices: list[str] = field(default_factory=list)


def permute_for_gguf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection from HF's rotate-half RoPE layout to GGML's interleaved one.

    Hugging Face Llama rotates dimension j of each head together with dimension j + head_dim/2
    (``rotate_half``); llama.cpp's ``llama`` architecture uses GGML's "normal" RoPE, which rotates
    adjacent pairs (2j, 2j+1), the layout of Meta's original weights. HF's own conversion script
    permuted Meta's rows into the half-split order, and llama.cpp's ``convert_hf_to_gguf.py`` undoes that
    with exactly this permutation (per head: rows [0..d/2) and [d/2..d) are interleaved). Since q·k only
    sees both vectors permuted the same way, attention scores are unchanged; v and o are not touched.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def unpermute_from_gguf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_for_gguf` (for tests and for reading GGUF weights back)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def read_gguf_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a ``llama`` GGUF file as a float32 Llama state dict (dequantized, q/k un-permuted).

    The inverse of the exporter's tensor step, used to check an export against what llama.cpp will read
    (tests compare a stock ``LlamaForCausalLM`` built from these weights with llama.cpp's own logits).
    """
    # a real cycle: the importer (from_gguf) uses this module's unpermute_from_gguf
    from mobillama.convert.from_gguf import GGUFFile, hf_config_from_gguf, llama_state_from_gguf

    gf = GGUFFile(path)  # the importer's reader: the same names, dequantization and un-permutation
    return llama_state_from_gguf(gf, hf_config_from_gguf(gf))


def export_gguf(
    ckpt: str | Path, out: str | Path, *, gguf_type: str = "f16", overwrite: bool = False
) -> GGUFReport:
    """Write the checkpoint ``ckpt`` as the GGUF file ``out`` (atomically: a temp file renamed at the end)."""
    if gguf_type not in GGUF_TYPES:
        raise MobiLlamaError(f"unknown GGUF type {gguf_type!r}; choose one of: {', '.join(GGUF_TYPES)}")
    out = Path(out)
    if out.is_dir():
        raise MobiLlamaError(f"output {out} is a directory; give a file name such as model.gguf")
    if out.exists() and not overwrite:
        raise MobiLlamaError(f"output {out} already exists (choose another path or use --overwrite)")
    config, state = load_checkpoint(ckpt)
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }[gguf_type]
    report = GGUFReport(path=str(out), type=gguf_type, num_tensors=0, tensor_types={}, vocab="")
    vocab = read_vocab(Path(ckpt), config, report.notices)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    writer = None
    try:
        writer = gguf.GGUFWriter(tmp, arch="llama")
        _write_metadata(writer, config, Path(ckpt).name, gguf_type)
        if vocab is not None:
            _write_vocab(writer, vocab)
            report.vocab = vocab["model"]
        else:  # llama.cpp's "no vocabulary" type: the file loads and runs token ids, but has no text I/O
            writer.add_tokenizer_model("no_vocab")
            report.vocab = "no_vocab"
        _write_tensors(writer, config, state, qtype, report)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    report.file_bytes = out.stat().st_size
    return report


def _write_metadata(writer, config: ModelConfig, name: str, gguf_type: str) -> None:
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    scaling = config.rope_scaling
    if scaling is not None and scaling["rope_type"] == "linear":  # llama.cpp's own keys
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif scaling is not None:  # llama3: the divisors tensor (_write_tensors) and the context they assume
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[gguf_type]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # Not read by llama.cpp; records what the file stores so a reader can see the FFN was duplicated.
    writer.add_string("mobillama.ffn_sharing", config.ffn_sharing)


def _write_tensors(
    writer, config: ModelConfig, state: dict[str, torch.Tensor], qtype, report: GGUFReport
) -> None:
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors = llama_state_dict(config, state)
    done: dict[int, tuple[np.ndarray, Any]] = {}  # id(source tensor) -> encoded data: one per shared FFN
    fallback: list[str] = []
    for key, tensor in tqdm(tensors.items(), desc=f"encoding {qtype.name}", unit="tensor", disable=None):
        gguf_name = name_map.get_name(key, try_suffixes=(".weight",))
        if gguf_name is None:
            raise MobiLlamaError(f"tensor {key!r} has no llama.cpp name")
        if id(tensor) in done:
            data, raw_type = done[id(tensor)]
        else:
            w = tensor.detach().float()
            if key.endswith("self_attn.q_proj.weight"):
                w = permute_for_gguf(w, config.num_attention_heads)
            elif key.endswith("self_attn.k_proj.weight"):
                w = permute_for_gguf(w, config.num_key_value_heads)
            array = w.numpy()
            if array.ndim == 1:
                data, raw_type = array.astype(np.float32), gguf.GGMLQuantizationType.F32
            elif qtype == gguf.GGMLQuantizationType.F32:
                data, raw_type = array.astype(np.float32), qtype
            elif qtype != gguf.GGMLQuantizationType.F16 and array.shape[-1] % 32 == 0:
                data, raw_type = gguf.quants.quantize(array, qtype), qtype
            else:
                data, raw_type = array.astype(np.float16), gguf.GGMLQuantizationType.F16
            done[id(tensor)] = (data, raw_type)
        if raw_type in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            if raw_type != qtype and data.ndim == 2:
                fallback.append(gguf_name)
            writer.add_tensor(gguf_name, data)
        else:
            writer.add_tensor(gguf_name, data, raw_dtype=raw_type)
        report.tensor_types[raw_type.name] = report.tensor_types.get(raw_type.name, 0) + 1
        report.num_tensors += 1
    scaling = config.rope_scaling
    if scaling is not None and scaling["rope_type"] == "llama3":  # llama.cpp divides each frequency by these
        plain = rope_inv_freq(config.head_dim, config.rope_theta)
        scaled = rope_inv_freq(config.head_dim, config.rope_theta, scaling)
        writer.add_tensor("rope_freqs.weight", (plain / scaled).numpy().astype(np.float32))
        report.tensor_types["F32"] = report.tensor_types.get("F32", 0) + 1
        report.num_tensors += 1
    if fallback:
        report.notices.append(
            f"{len(fallback)} tensors have rows not divisible by 32 and are stored as F16 "
            f"(first: {fallback[0]})"
        )


# --- vocabulary ----------------------------------------------------------------------------------------

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_PAD_TOKEN = re.compile(r"\[PAD\d+\]")


def read_vocab(ckpt: Path, config: ModelConfig, notices: list[str]) -> dict[str, Any] | None:
    """Tokens, scores, types and special ids for ``tokenizer.ggml.*``; None (with a notice) if no tokenizer.

    A SentencePiece ``tokenizer.model`` is read with gguf's own ``SentencePieceVocab``. A ``tokenizer.json``
    BPE with byte fallback (the Llama convention this project's tokenizers follow) becomes llama.cpp's
    ``llama`` (SentencePiece-style) vocabulary; gguf's ``LlamaHfVocab`` would give every token the same
    score, which leaves llama.cpp no merge order, so scores here are minus the rank of the merge that
    forms each token. A byte-level BPE without fallback becomes a ``gpt2`` vocabulary with its merges.
    """
    tok_config = (
        read_json_object(ckpt / "tokenizer_config.json") if (ckpt / "tokenizer_config.json").is_file() else {}
    )
    if (ckpt / "tokenizer.model").is_file():
        try:
            spm = gguf.SentencePieceVocab(ckpt)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError for corrupt models
            raise MobiLlamaError(
                f"{ckpt / 'tokenizer.model'}: not a readable SentencePiece model ({e})"
            ) from None
        tokens, scores, types = [], [], []
        for text, score, tok_type in spm.all_tokens():
            tokens.append(text.decode("utf-8"))
            scores.append(float(score))
            types.append(int(tok_type))
        vocab = {"model": "llama", "tokens": tokens, "scores": scores, "types": types, "merges": None}
    elif (ckpt / "tokenizer.json").is_file():
        vocab = _vocab_from_tokenizer_json(ckpt / "tokenizer.json", notices)
    else:
        notices.append(
            f"no tokenizer in {ckpt}: the GGUF has no vocabulary (tokenizer.ggml.model 'no_vocab'); "
            "llama.cpp loads it and runs token ids but cannot encode or decode text: export a checkpoint "
            "that carries its tokenizer files for that"
        )
        return None
    n = len(vocab["tokens"])
    if n > config.vocab_size:
        raise MobiLlamaError(
            f"{ckpt}: the tokenizer has {n} tokens but the model's vocab_size is {config.vocab_size}"
        )
    if n < config.vocab_size:  # embedding rows beyond the tokenizer: padding tokens, as llama.cpp does
        notices.append(f"tokenizer has {n} tokens, model {config.vocab_size}: padded with [PAD] tokens")
        for i in range(n, config.vocab_size):
            vocab["tokens"].append(f"[PAD{i}]")
            vocab["scores"].append(-1000.0)
            vocab["types"].append(int(gguf.TokenType.UNUSED))
    index = {t: i for i, t in enumerate(vocab["tokens"])}

    def special(name: str, default: int | None) -> int | None:
        value = tok_config.get(name)
        if isinstance(value, dict):  # AddedToken serialised as a mapping
            value = value.get("content")
        if isinstance(value, str) and value in index:
            return index[value]
        return default

    vocab["bos"] = special("bos_token", config.bos_token_id)
    vocab["eos"] = special("eos_token", config.eos_token_id)
    vocab["unk"] = special("unk_token", None)
    vocab["pad"] = special("pad_token", None)
    # The flags as the tokenizer itself applies them: tokenizer_config.json when it says, else what the
    # tokenizer.json post-processor adds (a byte-level BPE such as SmolLM's adds no BOS).
    added = vocab.pop("post_processor_adds", (vocab["model"] == "llama", False))
    vocab["add_bos"] = bool(tok_config.get("add_bos_token", added[0]))
    vocab["add_eos"] = bool(tok_config.get("add_eos_token", added[1]))
    template = tok_config.get("chat_template")
    if (ckpt / "chat_template.jinja").is_file():
        template = (ckpt / "chat_template.jinja").read_text(encoding="utf-8")
    vocab["chat_template"] = template if isinstance(template, str) else None
    return vocab


def _post_processor_adds(data: dict[str, Any]) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) according to a tokenizer.json ``TemplateProcessing`` post-processor."""
    post = data.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            kinds = ["SpecialToken" in piece for piece in single if isinstance(piece, dict)]
            return (bool(kinds) and kinds[0], bool(kinds) and kinds[-1] and len(kinds) > 1)
    return (False, False)


def _vocab_from_tokenizer_json(path: Path, notices: list[str]) -> dict[str, Any]:
    data = read_json_object(path)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        kind = model.get("type") if isinstance(model, dict) else None
        raise MobiLlamaError(f"{path}: tokenizer model {kind!r} is not supported for GGUF export (BPE only)")
    base: dict[str, int] = model["vocab"]
    added = {
        t["content"]: t for t in data.get("added_tokens") or [] if isinstance(t, dict) and "content" in t
    }
    by_id: dict[int, str] = {i: t for t, i in base.items()}
    for content, t in added.items():
        by_id.setdefault(int(t["id"]), content)
    size = max(by_id) + 1
    if len(by_id) != size:
        missing = next(i for i in range(size) if i not in by_id)
        raise MobiLlamaError(f"{path}: token id {missing} is missing from the vocabulary")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    tokens = [by_id[i] for i in range(size)]
    types = []
    unk = model.get("unk_token")
    for tok in tokens:
        if model.get("byte_fallback") and _BYTE_TOKEN.fullmatch(tok):
            types.append(gguf.TokenType.BYTE)
        elif tok == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif tok in added and added[tok].get("special"):
            types.append(gguf.TokenType.CONTROL)
        elif tok in added:
            types.append(gguf.TokenType.USER_DEFINED)
        elif _PAD_TOKEN.fullmatch(tok):  # padding rows this exporter added (they come back on import)
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.NORMAL)
    if model.get("byte_fallback"):
        rank: dict[str, int] = {}
        for r, merge in enumerate(merges):
            rank.setdefault(merge.replace(" ", "", 1), r)
        # Higher score = merged first in llama.cpp's SentencePiece-style tokenizer; tokens no merge forms
        # (characters, bytes, specials) are never merge candidates, so their score does not matter.
        scores = [-float(rank.get(tok, len(merges))) for tok in tokens]
        return {
            "model": "llama",
            "tokens": tokens,
            "scores": scores,
            "types": [int(t) for t in types],
            "merges": None,
            "post_processor_adds": _post_processor_adds(data),
        }
    pre = gguf_pre_tokenizer_name(data)
    if pre is None:
        pre = "default"
        notices.append(
            f"{path}: its pre-tokenizer matches none llama.cpp knows; written as 'default', so llama.cpp "
            "may split text differently from this tokenizer"
        )
    return {
        "model": "gpt2",
        "pre": pre,
        "tokens": tokens,
        "scores": [0.0] * size,
        "types": [int(t) for t in types],
        "merges": merges,
        "post_processor_adds": _post_processor_adds(data),
    }


def _write_vocab(writer, vocab: dict[str, Any]) -> None:
    writer.add_tokenizer_model(vocab["model"])
    if vocab["model"] == "gpt2":
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_merges(vocab["merges"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if vocab[key] is not None:
            add(vocab[key])
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])
