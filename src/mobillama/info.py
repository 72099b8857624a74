"""Parameter accounting: where the parameters of a config go, and what sharing the FFN saves."""

from __future__ import annotations

from typing import Any

import torch

from mobillama.config import ModelConfig

BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


def parameter_report(config: ModelConfig) -> dict[str, Any]:
    """Unique parameter counts per part, bytes per dtype, and the saving from sharing the FFN.

    Counted on a model built on the meta device, so even the 1.2B preset needs no memory. "Unique"
    means a shared FFN or a tied head counts once: that is what is stored and what is trained.
    """
    from mobillama.model import MobiLlama

    with torch.device("meta"):
        model = MobiLlama(config)
    parts = {"embeddings": 0, "attention": 0, "ffn": 0, "norms": 0, "lm_head": 0}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "embed_tokens" in name:
            parts["embeddings"] += p.numel()
        elif "self_attn" in name:
            parts["attention"] += p.numel()
        elif ".ffns." in name:
            parts["ffn"] += p.numel()
        elif "norm" in name:
            parts["norms"] += p.numel()
        elif "lm_head" in name:
            parts["lm_head"] += p.numel()
    total = sum(parts.values())
    ffn_per_copy = 3 * config.hidden_size * config.intermediate_size
    unshared_total = total - parts["ffn"] + ffn_per_copy * config.num_hidden_layers
    return {
        "config": config.to_dict(),
        "parameters": {**parts, "total": total},
        "ffn_copies_stored": config.num_ffns,
        "ffn_uses_per_token": config.num_hidden_layers,
        "bytes": {dtype: int(total * b) for dtype, b in BYTES_PER_PARAM.items()},
        "unshared_total": unshared_total,
        "saving_from_sharing": {
            "parameters": unshared_total - total,
            "fraction": (unshared_total - total) / unshared_total,
        },
    }


def format_report(report: dict[str, Any], title: str) -> str:
    p = report["parameters"]
    lines = [
        f"{title}",
        f"  ffn_sharing: {report['config']['ffn_sharing']} "
        f"({report['ffn_copies_stored']} FFN stored, used by {report['ffn_uses_per_token']} layers)",
    ]
    for part in ("embeddings", "attention", "ffn", "norms", "lm_head", "total"):
        share = p[part] / p["total"] if p["total"] else 0.0
        lines.append(f"  {part:<11} {p[part]:>15,}  {p[part] / 1e6:10.1f}M  {share:6.1%}")
    lines.append(
        "  bytes       " + "  ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in report["bytes"].items())
    )
    s = report["saving_from_sharing"]
    lines.append(
        f"  sharing saves {s['parameters'] / 1e6:,.1f}M parameters ({s['fraction']:.1%}) "
        f"against one FFN per layer ({report['unshared_total'] / 1e6:,.1f}M)"
    )
    return "\n".join(lines)
