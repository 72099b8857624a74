"""Aligned FFN merging (``mobillama share --strategy aligned``): permutation symmetry, exact recovery."""

from __future__ import annotations

import json

import pytest
import torch

from mobillama.checkpoint import load_checkpoint, save_checkpoint
from mobillama.cli import main
from mobillama.config import FFN_PROJS as FFN_WEIGHTS
from mobillama.config import get_preset
from mobillama.errors import MobiLlamaError
from mobillama.model import FeedForward, MobiLlama
from mobillama.train import share
from mobillama.train.ffn_align import (
    activation_features,
    align_and_merge,
    merge_ffns,
    permute_ffn,
    unit_importance,
)
from mobillama.train.share import share_state


def random_ffn(seed: int, hidden: int = 16, ffn: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "gate_proj": torch.randn(ffn, hidden, generator=g),
        "up_proj": torch.randn(ffn, hidden, generator=g),
        "down_proj": torch.randn(hidden, ffn, generator=g),
    }


def run_ffn(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    config = get_preset("micro").replace(
        hidden_size=weights["gate_proj"].shape[1], intermediate_size=weights["gate_proj"].shape[0]
    )
    module = FeedForward(config)
    module.load_state_dict({f"{w}.weight": weights[w] for w in FFN_WEIGHTS})
    with torch.no_grad():
        return module(x)


def test_permuting_hidden_units_leaves_the_function_unchanged():
    ffn = random_ffn(0)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(perm, torch.arange(24))
    x = torch.randn(5, 16)
    moved = permute_ffn(ffn, perm)
    assert not torch.equal(moved["gate_proj"], ffn["gate_proj"])
    torch.testing.assert_close(run_ffn(moved, x), run_ffn(ffn, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reference", [0, 1, 2])
def test_aligned_merge_of_permuted_copies_recovers_the_ffn_and_mean_does_not(reference):
    ffn = random_ffn(2)
    copies = [ffn] + [
        permute_ffn(ffn, torch.randperm(24, generator=torch.Generator().manual_seed(s))) for s in (3, 4)
    ]
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(5))
    merged = align_and_merge(copies, reference)
    expected = run_ffn(ffn, x)  # outputs reach ~1e3: a tolerance relative to their scale, not 1e-5 absolute
    scale = expected.abs().max().item()
    torch.testing.assert_close(run_ffn(merged, x), expected, rtol=0, atol=1e-6 * scale)
    if reference == 0:  # the reference's unit order is kept: the very same weights
        for w in FFN_WEIGHTS:
            torch.testing.assert_close(merged[w], ffn[w])
    plain = merge_ffns(copies)
    assert (run_ffn(plain, x) - run_ffn(ffn, x)).abs().max() > 0.1


def test_activation_matching_and_weighting_recover_permuted_copies():
    ffn = random_ffn(5)
    other = permute_ffn(ffn, torch.randperm(24, generator=torch.Generator().manual_seed(6)))
    inputs = torch.randn(200, 16)
    importance = [unit_importance(f, inputs) for f in (ffn, other)]
    merged = align_and_merge([ffn, other], 1, features=activation_features(inputs), importance=importance)
    x = torch.randn(4, 16)
    torch.testing.assert_close(run_ffn(merged, x), run_ffn(ffn, x), rtol=1e-5, atol=1e-5)


def permuted_base(seed: int = 0) -> tuple:
    """A dedicated-FFN micro model whose every layer's FFN is a permutation of layer 0's: merged aligned,
    the shared model must compute exactly what the dedicated one does."""
    torch.manual_seed(seed)
    config = get_preset("micro").replace(ffn_sharing="none")
    state = MobiLlama(config).state_dict()
    first = {w: state[f"model.ffns.0.{w}.weight"] for w in FFN_WEIGHTS}
    for layer in range(1, config.num_hidden_layers):
        moved = permute_ffn(first, torch.randperm(config.intermediate_size))
        for w in FFN_WEIGHTS:
            state[f"model.ffns.{layer}.{w}.weight"] = moved[w].clone()
    return config, state


def logits_of(config, state, ids):
    model = MobiLlama(config).eval()
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("sharing", ["all", "group:2", "group:3"])
@pytest.mark.parametrize(
    "strategy,options",
    [
        ("aligned", {}),
        ("aligned:0", {"iters": 0}),
        ("aligned:auto", {}),
        ("aligned", {"match": "activations", "weighting": "activation"}),
    ],
)
def test_aligned_strategies_recover_a_model_of_permuted_ffns(sharing, strategy, options):
    config, state = permuted_base()
    target = config.replace(ffn_sharing=sharing)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    calibration = torch.randint(3, 256, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    out = share_state(state, config, target, strategy, calibration_ids=calibration, **options)
    assert sum(k.startswith("model.ffns.") for k in out) == 3 * target.num_ffns
    expected = logits_of(config, state, ids)
    torch.testing.assert_close(logits_of(target, out, ids), expected, rtol=1e-4, atol=1e-4)
    mean = share_state(state, config, target, "mean")
    assert (logits_of(target, mean, ids) - expected).abs().max() > 1e-2


def test_aligned_auto_picks_the_reference_by_calibration_loss(monkeypatch):
    """Groups whose FFNs really differ: auto's choice is never worse on the calibration text than the
    middle reference (``aligned``), which is among its candidates."""
    torch.manual_seed(1)
    config = get_preset("micro").replace(ffn_sharing="none")
    state = MobiLlama(config).state_dict()
    target = config.replace(ffn_sharing="all")
    ids = torch.randint(3, 256, (80,), generator=torch.Generator().manual_seed(2)).tolist()
    said = []
    auto = share_state(state, config, target, "aligned:auto", calibration_ids=ids, say=said.append)
    middle = share_state(state, config, target, "aligned")
    loss = lambda s: share.calibration_loss(share._build(target, s), ids)  # noqa: E731
    assert loss(auto) <= loss(middle) + 1e-6
    assert len(said) == 1 and "reference layer" in said[0]
    model = share._build(target, auto)  # the shortcut auto scores with: layers from ``start`` on only
    for start in (0, 2):
        prefix = share._layer_inputs(model, ids, start)
        assert share._suffix_loss(model, ids, start, prefix) == pytest.approx(loss(auto), rel=1e-5)


def test_aligned_options_need_a_calibration_text_and_valid_values():
    config, state = permuted_base()
    target = config.replace(ffn_sharing="all")
    with pytest.raises(MobiLlamaError, match="needs a calibration text"):
        share_state(state, config, target, "aligned:auto")
    with pytest.raises(MobiLlamaError, match="--match must be one of"):
        share_state(state, config, target, "aligned", match="cosine")
    with pytest.raises(MobiLlamaError, match="apply to the aligned strategies"):
        share_state(state, config, target, "mean", weighting="activation", calibration_ids=[1, 2, 3])
    with pytest.raises(MobiLlamaError, match="must be 0..0; groups of 3 layers, the last of 1"):
        share_state(state, config, config.replace(ffn_sharing="group:3"), "aligned:2")


@pytest.fixture
def permuted_ckpt(tmp_path):
    config, state = permuted_base()
    model = MobiLlama(config)
    model.load_state_dict(state)
    return save_checkpoint(model, config, tmp_path / "base")


def test_share_cli_aligned_records_its_options(permuted_ckpt, tmp_path, capsys):
    out = tmp_path / "shared"
    args = [
        "share",
        "--from",
        str(permuted_ckpt),
        "--strategy",
        "aligned",
        "--sharing",
        "group:3",
        "--iters",
        "1",
    ]
    assert main([*args, "--out", str(out)]) == 0
    lineage = json.loads((out / "share.json").read_text())
    assert lineage["strategy"] == "aligned" and lineage["iters"] == 1 and lineage["match"] == "weights"
    config, state = load_checkpoint(out)
    assert config.ffn_sharing == "group:3" and config.num_ffns == 2
    ids = torch.randint(3, 256, (1, 10))
    base_config, base_state = load_checkpoint(permuted_ckpt)
    torch.testing.assert_close(
        logits_of(config, state, ids), logits_of(base_config, base_state, ids), rtol=1e-4, atol=1e-4
    )


def test_share_cli_bad_input_is_one_line(permuted_ckpt, tmp_path, capsys):
    def run(*extra):
        return main(["share", "--from", str(permuted_ckpt), "--out", str(tmp_path / "x"), *extra])

    assert run("--strategy", "aligned", "--sharing", "group:9") == 2
    assert "the group is larger than the 4 layers it applies to" in capsys.readouterr().err
    assert run("--strategy", "aligned:auto") == 2  # the micro checkpoint has no tokenizer
    assert "carries no tokenizer" in capsys.readouterr().err
    assert run("--strategy", "aligned:x") == 2
    assert "'aligned:auto'" in capsys.readouterr().err
    assert run("--strategy", "aligned", "--iters", "-1") == 2
    err = capsys.readouterr().err
    assert "--iters must be >= 0" in err and err.count("\n") == 1 and "Traceback" not in err
    assert (
        main(["share", "--from", str(permuted_ckpt), "--strategy", "aligned", "--out", str(tmp_path / "s")])
        == 0
    )
    assert (
        main(["share", "--from", str(tmp_path / "s"), "--strategy", "aligned", "--out", str(tmp_path / "y")])
        == 2
    )
    assert "already shares its FFN" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_real_model_aligned_merge_beats_plain_mean(real_model):
    """SmolLM2-135M-Instruct, FFNs shared by pairs of layers: aligned merging gives a lower perplexity on
    the reference text than plain averaging (1 window of 512 tokens, to stay short)."""
    from mobillama.eval.perplexity import reference_text, windowed_perplexity
    from mobillama.tokenizer import load_tokenizer

    _, real_ckpt = real_model  # skips only where the model cannot be fetched
    config, state = load_checkpoint(real_ckpt)
    target = config.replace(ffn_sharing="group:2")
    ids = load_tokenizer(real_ckpt).encode(reference_text(4000), parse_special=False)
    calibration = share.load_calibration_ids(real_ckpt, None, share.CALIBRATION_TOKENS)

    def perplexity(strategy: str, **options) -> float:
        merged = share_state(state, config, target, strategy, calibration_ids=calibration, **options)
        return windowed_perplexity(share._build(target, merged), ids, max_windows=1)["perplexity"]

    mean = perplexity("mean")
    aligned = perplexity("aligned", iters=0, weighting="activation")
    assert aligned < mean
