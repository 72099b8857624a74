"""Study arms: model configs for each comparison, with parameter counts matched where the paper matches them.

The paper (Table 5) compares, at equal parameter count and token budget, a shared-FFN model in the
"large-base" shape against two dedicated-FFN baselines: baseline1 keeps the depth and thins the hidden
size, baseline2 keeps the width and drops layers. Its baseline shapes for 0.5B are only sketched
in the paper, so at small scale we *solve* for them: baseline1's hidden size and baseline2's
depth (then its FFN width, for the remainder) are chosen to land within a tolerance of the shared model's
parameter count. The other arms vary one thing each: the degree of sharing, the initialisation, and the
width of the shared FFN (the 0.8B recipe's widening).
"""

from __future__ import annotations

from dataclasses import dataclass

from mobillama.config import ModelConfig
from mobillama.errors import MobiLlamaError


def count_parameters(config: ModelConfig) -> int:
    """Unique parameters, in closed form (same numbers as `mobillama info`, without building anything)."""
    h, f, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    head = 0 if config.tie_word_embeddings else V * h
    attention = L * (2 * h * h + 2 * h * kv)
    norms = (2 * L + 1) * h
    return V * h + head + attention + norms + config.num_ffns * 3 * h * f


@dataclass(frozen=True)
class Arm:
    """One model of the study: its name, config, and (for the init arm) the arm whose checkpoint seeds it."""

    name: str
    config: ModelConfig
    question: str
    init_from: str | None = None  # name of an arm whose trained checkpoint initialises this one (via `share`)
    share_strategy: str | None = None

    @property
    def parameters(self) -> int:
        return count_parameters(self.config)


def _solve_ffn_width(candidate: ModelConfig, target: int) -> ModelConfig:
    """The FFN width (a multiple of 8) that brings ``candidate`` closest to ``target`` parameters.

    Parameters are linear in the FFN width, so the width is solved exactly, then rounded.
    """
    per_unit = candidate.num_ffns * 3 * candidate.hidden_size
    rest = count_parameters(candidate.replace(intermediate_size=8)) - 8 * per_unit
    width = max(8, int(round((target - rest) / per_unit / 8)) * 8)
    return candidate.replace(intermediate_size=width)


def _closest_shape(
    shared: ModelConfig, candidates: list[ModelConfig], tolerance: float, name: str
) -> ModelConfig:
    """Among shapes matched by FFN width, the one whose FFN stays nearest the shared model's width."""
    target = count_parameters(shared)
    matched = [_solve_ffn_width(c, target) for c in candidates]
    matched = [c for c in matched if abs(count_parameters(c) - target) / target <= tolerance]
    if not matched:
        raise MobiLlamaError(f"cannot match {name} to the shared model's parameters within {tolerance:.0%}")
    return min(matched, key=lambda c: abs(c.intermediate_size - shared.intermediate_size))


def thin_baseline(shared: ModelConfig, tolerance: float) -> ModelConfig:
    """Baseline1: same depth, dedicated FFNs, a thinner hidden size (head count kept, head size even)."""
    step = 2 * shared.num_attention_heads
    candidates = [
        shared.replace(hidden_size=h, ffn_sharing="none") for h in range(step, shared.hidden_size, step)
    ]
    return _closest_shape(shared, candidates, tolerance, "baseline1")


def shallow_baseline(shared: ModelConfig, tolerance: float) -> ModelConfig:
    """Baseline2: same width, dedicated FFNs, fewer layers."""
    candidates = [
        shared.replace(num_hidden_layers=n, ffn_sharing="none") for n in range(1, shared.num_hidden_layers)
    ]
    return _closest_shape(shared, candidates, tolerance, "baseline2")


def build_arms(shared: ModelConfig, *, tolerance: float = 0.02, wide_factor: float = 1.8) -> list[Arm]:
    """All arms of the study from one shared-FFN base config (``ffn_sharing`` is forced to ``all``)."""
    shared = shared.replace(ffn_sharing="all")
    wide_ffn = int(round(shared.intermediate_size * wide_factor / 8)) * 8
    arms = [
        Arm("shared", shared, "matched parameters"),
        Arm("baseline1-thin", thin_baseline(shared, tolerance), "matched parameters"),
        Arm("baseline2-shallow", shallow_baseline(shared, tolerance), "matched parameters"),
        Arm("large-base", shared.replace(ffn_sharing="none"), "matched parameters (upper reference)"),
        Arm("group-2", shared.replace(ffn_sharing="group:2"), "degree of sharing"),
        Arm("group-4", shared.replace(ffn_sharing="group:4"), "degree of sharing"),
        Arm(
            "shared-from-large-base", shared, "initialisation", init_from="large-base", share_strategy="mean"
        ),
        Arm("shared-wide", shared.replace(intermediate_size=wide_ffn), "wider shared FFN"),
    ]
    return arms
