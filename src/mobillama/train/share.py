"""Large base -> shared FFN: initialise a MobiLlama from a dedicated-FFN checkpoint by real weight transfer.

The paper describes starting the shared model from a larger base; the original release's training code
starts from random initialisation and never transferred weights. Here attention, norms, embeddings and head
are copied as they are and the FFNs are collapsed:

- ``layer:K``  every shared FFN takes the FFN of the K-th layer it serves (0-based): layer K with ``all``,
  layer K of each group with ``group:G``. When G does not divide the layer count the last group is
  shorter, so K must be below the smallest group's size (a one-line error names the valid range).
- ``mean``     each shared FFN is the element-wise mean of the FFNs of the layers it serves.

The result is an ordinary checkpoint (continue training it with ``mobillama pretrain --init-from``), with
``share.json`` recording the source, its hash and the strategy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mobillama.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from mobillama.config import ModelConfig
from mobillama.errors import MobiLlamaError

FFN_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def parse_strategy(strategy: str) -> tuple[str, int | None]:
    if strategy == "mean":
        return "mean", None
    head, _, k = strategy.partition(":")
    if head == "layer" and k.isdigit():
        return "layer", int(k)
    raise MobiLlamaError(f"--strategy must be 'mean' or 'layer:K' (K a layer index), got {strategy!r}")


def share_state(
    state: dict[str, torch.Tensor], source: ModelConfig, target: ModelConfig, strategy: str
) -> dict[str, torch.Tensor]:
    """The target state dict: non-FFN tensors copied, per-layer FFNs collapsed into the target's FFNs."""
    kind, k = parse_strategy(strategy)
    out = {name: t for name, t in state.items() if not name.startswith("model.ffns.")}
    group = target.ffn_group_size
    groups = [
        range(g * group, min((g + 1) * group, target.num_hidden_layers)) for g in range(target.num_ffns)
    ]
    smallest = min(len(layers) for layers in groups)
    if k is not None and k >= smallest:
        uneven = f"; groups of {group} layers, the last of {smallest}" if smallest < group else ""
        raise MobiLlamaError(
            f"--strategy layer:{k}: K indexes the layer within each group sharing an FFN "
            f"and must be 0..{smallest - 1}{uneven}"
        )
    for g, layers in enumerate(groups):
        for w in FFN_WEIGHTS:
            per_layer = [state[f"model.ffns.{source.ffn_index(i)}.{w}.weight"] for i in layers]
            if k is not None:
                value = per_layer[k].clone()
            else:
                value = torch.stack([t.float() for t in per_layer]).mean(0).to(per_layer[0].dtype)
            out[f"model.ffns.{g}.{w}.weight"] = value
    return out


def share_checkpoint(src: str | Path, strategy: str, out: str | Path, sharing: str = "all") -> Path:
    """Read a dedicated-FFN checkpoint, write a shared-FFN one (``sharing`` = "all" or "group:K")."""
    src = Path(src)
    config, state = load_checkpoint(src)
    if config.ffn_sharing != "none":
        raise MobiLlamaError(
            f"{src} already shares its FFN (ffn_sharing={config.ffn_sharing!r}); "
            "share needs a dedicated-FFN checkpoint (ffn_sharing 'none')"
        )
    target = config.replace(ffn_sharing=sharing)
    target.validate()
    if target.ffn_sharing == "none":
        raise MobiLlamaError("--sharing must be 'all' or 'group:K'")
    new_state = share_state(state, config, target, strategy)
    lineage = {
        "source": str(src),
        "source_model_sha256": sha256_file(src / "model.safetensors"),
        "strategy": strategy,
        "ffn_sharing": sharing,
        "source_params": sum(t.numel() for t in state.values()),
        "params": sum(t.numel() for t in new_state.values()),
    }
    out = Path(out)
    return save_checkpoint(new_state, target, out, tokenizer_dir=src, extra_files={"share.json": lineage})
