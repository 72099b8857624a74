"""Permutation alignment of FFNs: the math behind ``mobillama share --strategy aligned``.

An FFN ``down(silu(gate x) * up x)`` computes the same function under any permutation of its hidden units
(rows of gate and up, columns of down, permuted together), so two FFNs trained apart put related units at
unrelated positions. Aligning finds, for each FFN, the permutation that best matches a reference (weight
matching, "Git Re-Basin": ``scipy.optimize.linear_sum_assignment`` on unit-pair scores), and only then
averages. Kept apart from :mod:`mobillama.train.share` (which applies it to checkpoints) because it is
plain tensor math that needs no model, config or file.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from mobillama.config import FFN_PROJS

DEFAULT_ITERS = 3

# {"gate_proj": [ffn, hidden], "up_proj": [ffn, hidden], "down_proj": [hidden, ffn]}
FFN = dict[str, torch.Tensor]
Features = Callable[[FFN], torch.Tensor]  # FFN -> one row per hidden unit, compared by dot product


def permute_ffn(ffn: FFN, perm: torch.Tensor) -> FFN:
    """The same function with hidden unit ``perm[i]`` moved to position i (rows of gate/up, columns of down)."""
    return {
        "gate_proj": ffn["gate_proj"][perm],
        "up_proj": ffn["up_proj"][perm],
        "down_proj": ffn["down_proj"][:, perm],
    }


def weight_features(ffn: FFN) -> torch.Tensor:
    """Each hidden unit's weights: its gate row, up row and down column, concatenated ([ffn, 3 * hidden])."""
    return torch.cat([ffn["gate_proj"], ffn["up_proj"], ffn["down_proj"].T], dim=1).float()


def ffn_hidden(ffn: FFN, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU hidden activations ``silu(x gate^T) * (x up^T)`` ([N, ffn]) of inputs ``x`` [N, hidden]."""
    x = x.float()
    return F.silu(x @ ffn["gate_proj"].float().T) * (x @ ffn["up_proj"].float().T)


def activation_features(inputs: torch.Tensor) -> Features:
    """Each hidden unit's activations on ``inputs``, centred and scaled to unit norm: dot products of
    these rows are the units' correlations over the calibration text."""

    def features(ffn: FFN) -> torch.Tensor:
        h = ffn_hidden(ffn, inputs)
        h = h - h.mean(0)
        return (h / h.norm(dim=0).clamp_min(1e-12)).T

    return features


def match_units(reference: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The permutation ``perm`` maximising ``sum_i <reference[i], features[perm[i]]>`` (Hungarian method)."""
    score = (reference.double() @ features.double().T).numpy()
    rows, cols = linear_sum_assignment(score, maximize=True)
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.long)


def merge_ffns(ffns: list[FFN], importance: list[torch.Tensor] | None = None) -> FFN:
    """Average of FFNs whose hidden units are already aligned; per-unit weights ``importance[l]`` [ffn]."""
    out = {}
    for name in FFN_PROJS:
        stack = torch.stack([f[name].float() for f in ffns])  # [n, ffn, hidden] or [n, hidden, ffn]
        if importance is None:
            value = stack.mean(0)
        else:
            w = torch.stack(importance).float()  # [n, ffn]
            w = w / w.sum(0).clamp_min(1e-12)
            w = w[:, :, None] if name != "down_proj" else w[:, None, :]
            value = (stack * w).sum(0)
        out[name] = value.to(ffns[0][name].dtype)
    return out


def align_and_merge(
    ffns: list[FFN],
    reference: int,
    *,
    iters: int = DEFAULT_ITERS,
    features: Features = weight_features,
    importance: list[torch.Tensor] | None = None,
) -> FFN:
    """Permute every FFN onto ``ffns[reference]``, average; then ``iters`` rounds of aligning every FFN to
    the current average and averaging again."""

    def merged(perms: list[torch.Tensor]) -> FFN:
        aligned = [permute_ffn(f, p) for f, p in zip(ffns, perms, strict=True)]
        weights = None if importance is None else [w[p] for w, p in zip(importance, perms, strict=True)]
        return merge_ffns(aligned, weights)

    target = features(ffns[reference])
    perms = [
        torch.arange(target.shape[0]) if i == reference else match_units(target, features(f))
        for i, f in enumerate(ffns)
    ]
    result = merged(perms)
    for _ in range(iters):
        target = features(result)
        new = [match_units(target, features(f)) for f in ffns]
        if all(torch.equal(a, b) for a, b in zip(new, perms, strict=True)):
            break  # converged: the same permutations again
        perms, result = new, merged(new)
    return result


def unit_importance(ffn: FFN, inputs: torch.Tensor) -> torch.Tensor:
    """How much each hidden unit contributes in its own layer: RMS activation x norm of its down column."""
    rms = ffn_hidden(ffn, inputs).pow(2).mean(0).sqrt()
    return rms * ffn["down_proj"].float().norm(dim=0)
