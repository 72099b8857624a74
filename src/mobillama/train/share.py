"""Large base -> shared FFN: initialise a MobiLlama from a dedicated-FFN checkpoint by real weight transfer.

The paper describes starting the shared model from a larger base; the original release's training code
starts from random initialisation and never transferred weights. Here attention, norms, embeddings and head
are copied as they are and the FFNs of each group of layers that will share one are collapsed into it:

- ``layer:K``      every shared FFN takes the FFN of the K-th layer it serves (0-based): layer K with
  ``all``, layer K of each group with ``group:G``. When G does not divide the layer count the last group
  is shorter, so K must be below the smallest group's size (a one-line error names the valid range).
- ``mean``         the element-wise mean of the FFNs of the group. A baseline: hidden unit i of one layer
  has nothing to do with unit i of another (an FFN is the same function under any permutation of its
  hidden units), so on a trained model this averages unrelated units and the result is far off.
- ``aligned``      permute every FFN's hidden units to best match a reference FFN, then average (weight
  matching, "Git Re-Basin"): the reference is the group's middle layer (``aligned:K``: its K-th), unit
  pairs are scored by the dot product of their concatenated gate row, up row and down column, and
  ``scipy.optimize.linear_sum_assignment`` finds the permutation with the best total. Then ``iters``
  times: align every FFN to the current mean and average again.
- ``aligned:auto`` the same, with the reference of each group picked by the loss of the shared model on
  a short calibration text (a few candidate references per group, one group at a time).

Options: ``match="activations"`` scores unit pairs by the correlation of their activations on the
calibration text's FFN inputs instead of their weights; ``weighting="activation"`` averages each unit
weighted by its importance in its own layer (RMS activation on that layer's inputs times the norm of its
down column) instead of uniformly.

The result is an ordinary checkpoint (continue training it with ``mobillama pretrain --init-from``,
optionally distilling from the source with ``--distill-from``), with ``share.json`` recording the source,
its hash, the strategy and the options. See docs/sharing.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from mobillama.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from mobillama.config import FFN_PREFIX, FFN_PROJS, ModelConfig, ffn_weight_name
from mobillama.errors import MobiLlamaError
from mobillama.train.ffn_align import (
    DEFAULT_ITERS,
    FFN,
    Features,
    activation_features,
    align_and_merge,
    merge_ffns,
    unit_importance,
    weight_features,
)

MATCH_CHOICES = ("weights", "activations")
WEIGHTING_CHOICES = ("uniform", "activation")
AUTO_CANDIDATES = 4  # reference layers tried per group by aligned:auto (evenly spaced in the group)
CALIBRATION_TOKENS = 512


def parse_strategy(strategy: str) -> tuple[str, int | str | None]:
    """("mean", None), ("layer", K), ("aligned", None | K | "auto")."""
    head, sep, k = strategy.partition(":")
    if strategy == "mean":
        return "mean", None
    if head == "layer" and k.isdigit():
        return "layer", int(k)
    if head == "aligned" and not sep:
        return "aligned", None
    if head == "aligned" and (k.isdigit() or k == "auto"):
        return "aligned", int(k) if k.isdigit() else "auto"
    raise MobiLlamaError(
        f"--strategy must be 'mean', 'layer:K', 'aligned', 'aligned:K' or 'aligned:auto' "
        f"(K a layer index within each group), got {strategy!r}"
    )


# --- calibration ----------------------------------------------------------------------------------------


def calibration_text() -> str:
    """A default calibration text that ships with Python and is not ``reference_text()`` (the pydoc
    topics the docs' perplexities are measured on): the docstrings of some standard-library modules."""
    import argparse
    import collections
    import json
    import pathlib
    import textwrap

    docs = [m.__doc__ or "" for m in (textwrap, argparse, json, collections, pathlib)]
    return "\n\n".join(d.strip() for d in docs if d.strip())


def load_calibration_ids(source: Path, calibration: str | Path | None, tokens: int) -> list[int]:
    """Token ids of the calibration text (a file, or :func:`calibration_text`), with the source's tokenizer."""
    from mobillama.tokenizer import load_tokenizer

    if not any((source / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise MobiLlamaError(f"{source} carries no tokenizer; a calibration text needs one")
    if calibration is None:
        text = calibration_text()
    else:
        path = Path(calibration)
        if not path.is_file():
            raise MobiLlamaError(f"--calibration: file not found: {path}")
        text = path.read_text(encoding="utf-8", errors="replace")
    ids = load_tokenizer(source).encode(text, add_bos=True, parse_special=False)[:tokens]
    if len(ids) < 16:
        raise MobiLlamaError(f"the calibration text has {len(ids)} tokens; it needs at least 16")
    return ids


def _chunks(ids: list[int], ctx: int = 512) -> list[torch.Tensor]:
    return [
        torch.tensor(ids[i : i + ctx])[None] for i in range(0, len(ids) - 1, ctx) if len(ids[i : i + ctx]) > 1
    ]


@torch.no_grad()
def ffn_inputs(model: torch.nn.Module, ids: list[int]) -> list[torch.Tensor]:
    """Each layer's FFN input (the post-attention RMSNorm output) on ``ids``, [tokens, hidden] per layer;
    ``model`` has dedicated FFNs, so FFN i is layer i's."""
    captured: list[list[torch.Tensor]] = [[] for _ in model.model.ffns]
    hooks = [
        ffn.register_forward_pre_hook(
            lambda _m, args, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for i, ffn in enumerate(model.model.ffns)
    ]
    try:
        for chunk in _chunks(ids):
            model(chunk)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(c).float() for c in captured]


@torch.no_grad()
def calibration_loss(model: torch.nn.Module, ids: list[int]) -> float:
    """Mean next-token loss of ``model`` on ``ids`` (windows of up to 512 tokens)."""
    total, count = 0.0, 0
    for chunk in _chunks(ids):
        logits = model(chunk[:, :-1]).float()
        total += float(F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return total / count


@torch.no_grad()
def _layer_inputs(model: torch.nn.Module, ids: list[int], layer: int) -> list[torch.Tensor]:
    """The hidden states entering decoder layer ``layer``, one per calibration chunk."""
    captured: list[torch.Tensor] = []
    hook = model.model.layers[layer].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        for chunk in _chunks(ids):
            model(chunk[:, :-1])
    finally:
        hook.remove()
    return captured


@torch.no_grad()
def _suffix_loss(model: torch.nn.Module, ids: list[int], start: int, prefix: list[torch.Tensor]) -> float:
    """:func:`calibration_loss` from the hidden states entering layer ``start`` (layers before it unchanged)."""
    from mobillama.model import build_attention_mask, rope_cos_sin

    decoder, config = model.model, model.config
    total, count = 0.0, 0
    for chunk, x in zip(_chunks(ids), prefix, strict=True):
        B, T, _ = x.shape
        positions = torch.arange(T).expand(B, T)
        cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta, x.dtype, config.rope_scaling)
        mask = build_attention_mask(None, B, T, 0, x.device)
        for i in range(start, config.num_hidden_layers):
            x = decoder.layers[i](x, decoder.ffns[config.ffn_index(i)], cos, sin, mask, None)
        logits = model.lm_head(decoder.norm(x)).float()
        total += float(F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum"))
        count += T
    return total / count


# --- the state dict -------------------------------------------------------------------------------------


def share_state(
    state: dict[str, torch.Tensor],
    source: ModelConfig,
    target: ModelConfig,
    strategy: str,
    *,
    iters: int = DEFAULT_ITERS,
    match: str = "weights",
    weighting: str = "uniform",
    calibration_ids: list[int] | None = None,
    say: Callable[[str], None] = lambda _msg: None,
) -> dict[str, torch.Tensor]:
    """The target state dict: non-FFN tensors copied, per-layer FFNs collapsed into the target's FFNs.

    ``match="activations"``, ``weighting="activation"`` and ``aligned:auto`` need ``calibration_ids``.
    """
    kind, k = parse_strategy(strategy)
    if match not in MATCH_CHOICES:
        raise MobiLlamaError(f"--match must be one of {', '.join(MATCH_CHOICES)}, got {match!r}")
    if weighting not in WEIGHTING_CHOICES:
        raise MobiLlamaError(f"--weighting must be one of {', '.join(WEIGHTING_CHOICES)}, got {weighting!r}")
    if iters < 0:
        raise MobiLlamaError(f"--iters must be >= 0, got {iters}")
    if kind != "aligned" and (match != "weights" or weighting != "uniform"):
        raise MobiLlamaError(f"--match and --weighting apply to the aligned strategies, not {strategy!r}")
    out = {name: t for name, t in state.items() if not name.startswith(FFN_PREFIX)}
    groups = target.ffn_groups
    dedicated = target.ffn_dedicated_layers  # the first groups are single layers that keep their own FFN
    smallest = min(len(layers) for layers in groups[dedicated:])
    if isinstance(k, int) and k >= smallest:
        uneven = (
            f"; groups of {target.ffn_group_size} layers, the last of {smallest}"
            if smallest < target.ffn_group_size
            else ""
        )
        raise MobiLlamaError(
            f"--strategy {strategy}: K indexes the layer within each group sharing an FFN "
            f"and must be 0..{smallest - 1}{uneven}"
        )
    layer_ffns = [
        {w: state[ffn_weight_name(source.ffn_index(i), w)] for w in FFN_PROJS}
        for i in range(source.num_hidden_layers)
    ]
    inputs: list[torch.Tensor] | None = None
    if kind == "aligned" and (match == "activations" or weighting == "activation" or k == "auto"):
        if calibration_ids is None:
            raise MobiLlamaError(
                f"--strategy {strategy} with --match {match} --weighting {weighting} needs a calibration text"
            )
        if match == "activations" or weighting == "activation":
            inputs = ffn_inputs(_build(source, state), calibration_ids)

    def merged_group(layers: range, reference: int, rounds: int) -> FFN:
        ffns = [layer_ffns[i] for i in layers]
        features: Features = weight_features
        importance = None
        if inputs is not None:
            if match == "activations":
                features = activation_features(torch.cat([inputs[i] for i in layers]))
            if weighting == "activation":
                importance = [unit_importance(layer_ffns[i], inputs[i]) for i in layers]
        return align_and_merge(ffns, reference, iters=rounds, features=features, importance=importance)

    for g, layers in enumerate(groups):
        if g < dedicated:
            ffn = {w: t.clone() for w, t in layer_ffns[layers[0]].items()}
        elif kind == "layer":
            ffn = {w: t.clone() for w, t in layer_ffns[layers[k]].items()}
        elif kind == "mean":
            ffn = merge_ffns([layer_ffns[i] for i in layers])
        else:
            ffn = merged_group(layers, len(layers) // 2 if k in (None, "auto") else k, iters)
        for w in FFN_PROJS:
            out[ffn_weight_name(g, w)] = ffn[w]
    if k == "auto":
        out = _auto_references(out, target, groups, merged_group, calibration_ids, iters, say)
    return out


def _build(config: ModelConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from mobillama.model import MobiLlama

    with torch.device("meta"):
        model = MobiLlama(config)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.float().eval()


def _auto_references(
    state: dict[str, torch.Tensor],
    target: ModelConfig,
    groups: list[range],
    merged_group: Callable[[range, int, int], FFN],
    ids: list[int],
    iters: int,
    say: Callable[[str], None],
) -> dict[str, torch.Tensor]:
    """``aligned:auto``: group by group, keep the merge that gives the shared model the lowest calibration
    loss (the other groups as chosen so far) among: the middle reference refined (``aligned``), each of up
    to AUTO_CANDIDATES evenly spaced reference layers unrefined, and the best of those refined."""
    state = dict(state)
    model = _build(target, state)
    best_loss = calibration_loss(model, ids)
    for g, layers in enumerate(groups):
        n = len(layers)
        if n == 1:  # a dedicated layer (or a one-layer last group): nothing to choose
            continue
        ffn = model.model.ffns[g]
        prefix = _layer_inputs(model, ids, layers.start)  # groups before g are fixed: run them once

        def trial(
            candidate: FFN, ffn: torch.nn.Module = ffn, start: int = layers.start, prefix=prefix
        ) -> float:
            for w in FFN_PROJS:
                getattr(ffn, w).weight.data = candidate[w]
            return _suffix_loss(model, ids, start, prefix)

        best = {w: getattr(ffn, w).weight.detach().clone() for w in FFN_PROJS}
        best_ref, best_rounds = n // 2, iters
        spaced = {round(j * (n - 1) / max(1, AUTO_CANDIDATES - 1)) for j in range(min(n, AUTO_CANDIDATES))}
        for r in sorted(spaced):
            candidate = merged_group(layers, r, 0)
            loss = trial(candidate)
            if loss < best_loss:
                best_loss, best, best_ref, best_rounds = loss, candidate, r, 0
        if best_rounds == 0 and iters and n > 1:
            candidate = merged_group(layers, best_ref, iters)
            loss = trial(candidate)
            if loss < best_loss:
                best_loss, best, best_rounds = loss, candidate, iters
        for w in FFN_PROJS:
            getattr(ffn, w).weight.data = best[w]
            state[ffn_weight_name(g, w)] = best[w]
        say(
            f"ffn {g} (layers {layers.start}-{layers.stop - 1}): reference layer {layers[best_ref]}, "
            f"{best_rounds} refinement rounds, calibration loss {best_loss:.4f}"
        )
    return state


def share_checkpoint(
    src: str | Path,
    strategy: str,
    out: str | Path,
    sharing: str = "all",
    *,
    iters: int = DEFAULT_ITERS,
    match: str = "weights",
    weighting: str = "uniform",
    calibration: str | Path | None = None,
    say: Callable[[str], None] = lambda _msg: None,
) -> Path:
    """Read a dedicated-FFN checkpoint, write a shared-FFN one (``sharing``: "all", "group:K", or either
    after ``dedicated:N+``)."""
    src = Path(src)
    kind, k = parse_strategy(strategy)
    config, state = load_checkpoint(src)
    if config.ffn_sharing != "none":
        raise MobiLlamaError(
            f"{src} already shares its FFN (ffn_sharing={config.ffn_sharing!r}); "
            "share needs a dedicated-FFN checkpoint (ffn_sharing 'none')"
        )
    target = config.replace(ffn_sharing=sharing)
    target.validate()
    if target.num_ffns == config.num_hidden_layers:
        raise MobiLlamaError(
            f"--sharing {sharing} shares nothing: use 'all', 'group:K' (K >= 2) or 'dedicated:N+all' / "
            "'dedicated:N+group:K'"
        )
    shared_layers = config.num_hidden_layers - target.ffn_dedicated_layers
    if target.ffn_group_size > shared_layers:
        raise MobiLlamaError(
            f"--sharing {sharing}: the group is larger than the {shared_layers} layers it applies to "
            f"(K at most {shared_layers}, or 'all')"
        )
    needs_text = kind == "aligned" and (k == "auto" or match != "weights" or weighting != "uniform")
    ids = load_calibration_ids(src, calibration, CALIBRATION_TOKENS) if needs_text else None
    new_state = share_state(
        state,
        config,
        target,
        strategy,
        iters=iters,
        match=match,
        weighting=weighting,
        calibration_ids=ids,
        say=say,
    )
    lineage = {
        "source": str(src),
        "source_model_sha256": sha256_file(src / "model.safetensors"),
        "strategy": strategy,
        "ffn_sharing": sharing,
        "source_params": sum(t.numel() for t in state.values()),
        "params": sum(t.numel() for t in new_state.values()),
    }
    if kind == "aligned":
        lineage.update(iters=iters, match=match, weighting=weighting)
        if ids is not None:
            lineage["calibration"] = str(calibration) if calibration else "builtin: stdlib module docstrings"
            lineage["calibration_tokens"] = len(ids)
    return save_checkpoint(
        new_state, target, Path(out), tokenizer_dir=src, extra_files={"share.json": lineage}
    )
