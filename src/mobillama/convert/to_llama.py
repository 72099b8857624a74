"""Export a project checkpoint as a standard ``LlamaForCausalLM`` checkpoint.

Any Llama runtime (stock transformers without this package, vLLM, llama.cpp's converter, ...) can then
run the model. Llama has no notion of a shared FFN, so the shared FFN is written once *per layer* as
``model.layers.{i}.mlp.*``: the file grows (the 0.5B model becomes ~1.26B stored parameters) but the
math is unchanged. ``num_key_value_heads`` is the true value (the original release's config got it wrong).

This module is also the one place that maps project tensor names to Llama names; the GGUF exporter
builds on :func:`llama_state_dict`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from mobillama.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_directory,
    copy_tokenizer_files,
    load_checkpoint,
)
from mobillama.config import FFN_PREFIX, FFN_PROJS, ModelConfig, ffn_weight_name, parse_dtype
from mobillama.errors import MobiLlamaError

LAYER_PARTS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def llama_tensor_names(num_layers: int) -> list[str]:
    """Every Llama tensor name in canonical order (embeddings, layer by layer, final norm, head)."""
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{i}.{part}" for i in range(num_layers) for part in LAYER_PARTS]
    return [*names, "model.norm.weight", "lm_head.weight"]


def llama_state_dict(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Project tensors under Llama names, each layer's FFN as its own entry.

    The per-layer FFN entries are the *same* tensor objects (no copy); writers that cannot store aliases
    (safetensors) must clone them. A tied LM head is left out, as in Llama checkpoints.
    """
    ffn_of = {
        f"model.layers.{i}.mlp.{p}.weight": ffn_weight_name(config.ffn_index(i), p)
        for i in range(config.num_hidden_layers)
        for p in FFN_PROJS
    }
    names = llama_tensor_names(config.num_hidden_layers)
    out = {name: state[ffn_of.get(name, name)] for name in names if ffn_of.get(name, name) in state}
    out.update({k: v for k, v in state.items() if k not in out and not k.startswith(FFN_PREFIX)})
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def llama_config(config: ModelConfig, dtype: torch.dtype):
    """The equivalent ``transformers.LlamaConfig`` (model_type "llama", no remote code)."""
    # transformers (~2.5 s) only when writing a Llama checkpoint: to-gguf uses this module's names only
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        # transformers 5.x keeps rope_theta and the scaling in one mapping (4.x: rope_theta + rope_scaling)
        rope_parameters={
            **(config.rope_scaling or {"rope_type": "default"}),
            "rope_theta": config.rope_theta,
        },
        tie_word_embeddings=config.tie_word_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        initializer_range=config.initializer_range,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        architectures=["LlamaForCausalLM"],
        dtype=str(dtype).removeprefix("torch."),
    )


def export_llama(
    ckpt: str | Path, out: str | Path, *, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Write ``out`` as a ``LlamaForCausalLM`` checkpoint (config.json, model.safetensors, tokenizer)."""
    from transformers import GenerationConfig  # lazy, as in llama_config

    cast = parse_dtype(dtype) if dtype is not None else None
    out = Path(out)
    if out.exists() and not overwrite:  # fail before reading gigabytes
        raise MobiLlamaError(f"output {out} already exists (choose another path or remove it)")
    config, state = load_checkpoint(ckpt)
    tensors = llama_state_dict(config, state)
    # clone(): safetensors refuses tensors that share memory, and the per-layer FFNs all do.
    tensors = {
        k: (v.to(cast) if cast is not None and v.is_floating_point() else v).clone().contiguous()
        for k, v in tensors.items()
    }
    weights_dtype = next(v.dtype for v in tensors.values() if v.is_floating_point())
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        llama_config(config, weights_dtype).save_pretrained(tmp)
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(
            tmp
        )
        copy_tokenizer_files(ckpt, tmp)
        if not (tmp / CONFIG_NAME).is_file():  # save_pretrained's contract; guard the output anyway
            raise MobiLlamaError(f"{out}: transformers did not write {CONFIG_NAME}")
    return out
