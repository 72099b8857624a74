"""The kernel image of a quantized checkpoint: its weights exactly as the CPU kernels read them, in one
safetensors file that the lean runtime (:mod:`mobillama.infer.lean`) opens without PyTorch.

Why a file of its own: the lean runtime's point is a decode process without torch (~0.22 GB resident by
itself, more than SmolLM2-135M's int4 weights), but packing the weights for the kernels is torch code
(:mod:`mobillama.kernels.packing`, the joins of :mod:`mobillama.infer.decoder`). So a torch process loads
the checkpoint the usual way, builds the :class:`~mobillama.infer.decoder.FastDecoder` the default
runtime would use, and writes what its one-call decode step reads: packed matrices (q/k/v and gate/up
joined, a shared FFN once), norm weights, the LM head, the embedding rows the decoder would feed in, and
the rotary tables. Nothing is packed twice and both runtimes read the same bytes.

Run as ``python -m mobillama.infer.lean_image CKPT OUT`` (the lean runtime does so, once per checkpoint
version, in a child process).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from mobillama.errors import MobiLlamaError
from mobillama.infer.lean import IMAGE_KEY, IMAGE_VERSION, image_layout
from mobillama.kernels.bindings import params_per
from mobillama.kernels.clib import activation_block
from mobillama.model import rope_cos_sin

EMBED_CHUNK = 4096  # embedding rows computed per call while writing


def _matrix(tensors: dict[str, np.ndarray], name: str, m) -> dict:
    """Store a vnni-packed layer or joined projection under ``name``; its shape for the metadata."""
    packed, params, group, bits = m.vnni_matrix()
    tensors[f"{name}.w"] = packed.numpy()
    tensors[f"{name}.p"] = params.reshape(-1).numpy()
    return {
        "n": int(m.out_features),
        "group": int(group),
        "per": params_per(params, m.in_features, group),
        "bits": int(bits),
        "ab": activation_block(group, bits),
    }


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


@torch.inference_mode()
def write_image(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the kernel image of the quantized checkpoint ``checkpoint`` to ``out`` (atomically)."""
    from mobillama.infer.decoder import FastDecoder
    from mobillama.infer.load import describe_checkpoint, load_quantized, serve_embedding_from_file
    from mobillama.infer.quant_layers import QuantizedLinear

    what = describe_checkpoint(str(checkpoint))
    if not what.is_quantized:
        raise MobiLlamaError(
            f"{checkpoint}: the lean runtime runs quantized checkpoints only; make one with "
            "'mobillama quantize CKPT --bits 4|8 --out DIR'"
        )
    model = load_quantized(str(checkpoint), dtype=torch.bfloat16, int8_kernel="auto", int4_kernel="auto")
    serve_embedding_from_file(model, str(checkpoint))
    dec = FastDecoder(model)
    if dec.one_call_layers is None:
        raise MobiLlamaError(
            f"{checkpoint}: the lean runtime needs every projection on the project's int8/int4 kernel "
            "(this CPU or checkpoint does not allow it); use the default runtime"
        )
    c = model.config
    tensors: dict[str, np.ndarray] = {}
    layers, ffns = [], {}
    for i, layer in enumerate(model.model.layers):
        j = c.ffn_index(i)
        if str(j) not in ffns:  # a shared FFN is stored once
            ffns[str(j)] = {
                "gate_up": _matrix(tensors, f"ffn.{j}.gate_up", dec.gate_up_for_layer[i]),
                "down": _matrix(tensors, f"ffn.{j}.down", dec.ffn_for_layer[i].down_proj),
            }
        tensors[f"layer.{i}.norm1"] = _f32(layer.input_layernorm.weight)
        tensors[f"layer.{i}.norm2"] = _f32(layer.post_attention_layernorm.weight)
        layers.append(
            {
                "ffn": j,
                "eps1": layer.input_layernorm.eps,
                "eps2": layer.post_attention_layernorm.eps,
                "qkv": _matrix(tensors, f"layer.{i}.qkv", dec.qkv_for_layer[i]),
                "o": _matrix(tensors, f"layer.{i}.o", layer.self_attn.o_proj),
            }
        )
    tensors["norm"] = _f32(model.model.norm.weight)
    head = model.lm_head
    if isinstance(head, QuantizedLinear) and head.vnni_matrix() is not None:
        head_info = {"kind": "packed", **_matrix(tensors, "head", head)}
    elif dec.bf16_head_kernel:
        tensors["head.bf16"] = head.weight.detach().contiguous().view(torch.int16).numpy()
        head_info = {"kind": "bf16", "n": int(head.weight.shape[0])}
    else:
        raise MobiLlamaError(f"{checkpoint}: the lean runtime needs a quantized or bf16 LM head")
    # The rows the decoder feeds in: embed_tokens(ids) in fp32, stored in bf16 where that is exact.
    embed = np.empty((c.vocab_size, c.hidden_size), dtype=np.float32)
    for start in range(0, c.vocab_size, EMBED_CHUNK):
        ids = torch.arange(start, min(start + EMBED_CHUNK, c.vocab_size))
        embed[start : start + len(ids)] = _f32(model.model.embed_tokens(ids[None])[0])
    as_bf16 = torch.from_numpy(embed).to(torch.bfloat16)
    if torch.equal(as_bf16.float(), torch.from_numpy(embed)):
        tensors["embed.bf16"] = as_bf16.view(torch.int16).numpy()
    else:
        tensors["embed.f32"] = embed
    positions = torch.arange(c.max_position_embeddings)[None]
    cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, torch.float32, c.rope_scaling)
    tensors["rope.cos"], tensors["rope.sin"] = _f32(cos[0]), _f32(sin[0])
    meta = {
        "version": IMAGE_VERSION,
        "hidden": c.hidden_size,
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "intermediate": c.intermediate_size,
        "vocab": c.vocab_size,
        "max_positions": c.max_position_embeddings,
        "final_eps": model.model.norm.eps,
        "cache": "bf16" if dec.cache_dtype == torch.bfloat16 else "fp32",
        "layers": layers,
        "ffns": ffns,
        "head": head_info,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={IMAGE_KEY: json.dumps(meta)})
        image_layout(tmp)  # read back: a file the runtime would refuse is never left in place
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m mobillama.infer.lean_image CKPT OUT", file=sys.stderr)
        return 2
    try:
        write_image(args[0], args[1])
    except MobiLlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
