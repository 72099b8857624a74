"""Fixtures for the converters: checkpoints in the ORIGINAL release layout, built in code.

The reference model is a stock ``transformers.LlamaForCausalLM`` whose layers share one ``LlamaMLP``
object (MobiLlama's math expressed in stock Llama). It is saved the way the release was: a ``model_type:
llama`` config whose ``num_key_value_heads`` is wrong, one ``mlp.*`` copy per layer, ``rotary_emb.inv_freq``
buffers, single or sharded ``*.safetensors`` / ``pytorch_model*.bin`` with an index file.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from fixtures import llama_bpe_tokenizer

# Absolute, on logits whose max is ~14 (stock_llama's scales): ~7e-6 of max |logit|; float32 reordering
# measures <= 2e-5 absolute, a 10% rotary-base error ~1 and a wrong norm epsilon ~0.5.
TOL = 1e-4
TINY = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)


def stock_llama(shared: bool = True, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random stock Llama; with ``shared`` every layer uses layer 0's LlamaMLP object."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY, **overrides}, attn_implementation="eager", tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # trained-like scales (max |logit| ~14): a layout or rotary error shows clearly
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "lm_head" in name:
                p.mul_(20.0)
            elif "embed" not in name:
                p.mul_(5.0)
    if shared:
        for layer in model.model.layers:
            layer.mlp = model.model.layers[0].mlp
    return model


def reference_logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def release_config(model: LlamaForCausalLM, wrong_kv: int | None = 2, **extra) -> dict:
    """config.json as the release wrote it (transformers 4.x keys, remote-code auto_map, wrong kv field)."""
    c = model.config
    return {
        "architectures": ["MobiLlamaForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_mobillama.MobiLlamaConfig",
            "AutoModelForCausalLM": "modelling_mobillama.MobiLlamaForCausalLM",
        },
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "model_type": "llama",
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads if wrong_kv is None else wrong_kv,
        "pretraining_tp": 1,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.33.1",
        "use_cache": True,
        "vocab_size": c.vocab_size,
        **extra,
    }


def release_state(model: LlamaForCausalLM, inv_freq: bool = True) -> dict[str, torch.Tensor]:
    """Every layer's mlp.* as its own tensor (a full-state save), plus the inv_freq buffers."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if inv_freq:
        c = model.config
        hd = c.hidden_size // c.num_attention_heads
        buf = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        for i in range(c.num_hidden_layers):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = buf.clone()
    return state


def write_release(
    out: Path,
    state: dict[str, torch.Tensor],
    config: dict,
    *,
    fmt: str = "safetensors",
    shards: int = 1,
) -> Path:
    """Write ``state`` in the release layout: single file or ``shards`` files plus an index."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    keys = list(state)
    if fmt == "safetensors":
        single, index_name = "model.safetensors", "model.safetensors.index.json"

        def shard_name(i: int) -> str:
            return f"model-{i + 1:05d}-of-{shards:05d}.safetensors"

        def save(part: dict, path: Path) -> None:
            save_file(part, str(path), metadata={"format": "pt"})
    else:
        single, index_name = "pytorch_model.bin", "pytorch_model.bin.index.json"

        def shard_name(i: int) -> str:
            return f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"

        def save(part: dict, path: Path) -> None:
            torch.save(part, str(path))

    if shards == 1:
        save(state, out / single)
        return out
    weight_map = {}
    per = -(-len(keys) // shards)
    for i in range(shards):
        part = {k: state[k] for k in keys[i * per : (i + 1) * per]}
        save(part, out / shard_name(i))
        weight_map.update({k: shard_name(i) for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return out


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(1))


def leftovers(parent: Path, name: str) -> list[Path]:
    """Temporary siblings an interrupted write could leave behind (must be none)."""
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}")]


@pytest.fixture
def rel() -> SimpleNamespace:
    """The helpers above, as a fixture (pytest's importlib mode makes conftest unimportable by tests)."""
    return SimpleNamespace(
        TOL=TOL,
        TINY=TINY,
        stock_llama=stock_llama,
        reference_logits=reference_logits,
        release_config=release_config,
        release_state=release_state,
        write_release=write_release,
        make_tokenizer=llama_bpe_tokenizer,
        leftovers=leftovers,
    )
