"""`mobillama share` (real weight transfer large base -> shared FFN), `--init-from`, `plot`, CLI errors."""

from __future__ import annotations

import pytest
import torch

from mobillama.checkpoint import load_checkpoint, save_checkpoint
from mobillama.cli import main
from mobillama.config import get_preset
from mobillama.model import MobiLlama
from mobillama.train.metrics import read_metrics


@pytest.fixture
def large_base(tmp_path):
    torch.manual_seed(0)
    config = get_preset("micro").replace(ffn_sharing="none")
    return save_checkpoint(MobiLlama(config), config, tmp_path / "base")


def test_share_layer_and_mean(large_base, tmp_path):
    _, base = load_checkpoint(large_base)
    assert (
        main(["share", "--from", str(large_base), "--strategy", "layer:2", "--out", str(tmp_path / "l2")])
        == 0
    )
    config, state = load_checkpoint(tmp_path / "l2")
    assert config.ffn_sharing == "all" and not any(k.startswith("model.ffns.1.") for k in state)
    torch.testing.assert_close(state["model.ffns.0.up_proj.weight"], base["model.ffns.2.up_proj.weight"])
    torch.testing.assert_close(
        state["model.layers.3.self_attn.q_proj.weight"], base["model.layers.3.self_attn.q_proj.weight"]
    )
    assert (tmp_path / "l2" / "share.json").is_file()

    assert (
        main(
            [
                "share",
                "--from",
                str(large_base),
                "--strategy",
                "mean",
                "--sharing",
                "group:2",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    config, state = load_checkpoint(tmp_path / "m")
    assert config.num_ffns == 2
    expected = (base["model.ffns.2.down_proj.weight"] + base["model.ffns.3.down_proj.weight"]) / 2
    torch.testing.assert_close(state["model.ffns.1.down_proj.weight"], expected)


def test_share_bad_input(large_base, tmp_path, capsys):
    assert (
        main(["share", "--from", str(large_base), "--strategy", "layer:9", "--out", str(tmp_path / "x")]) == 2
    )
    assert (
        main(["share", "--from", str(large_base), "--strategy", "median", "--out", str(tmp_path / "x")]) == 2
    )
    assert (
        main(["share", "--from", str(tmp_path / "nope"), "--strategy", "mean", "--out", str(tmp_path / "x")])
        == 2
    )
    err = capsys.readouterr().err
    assert "must be 0..3" in err and "'mean', 'layer:K', 'aligned'" in err and "checkpoint not found" in err
    main(["share", "--from", str(large_base), "--strategy", "mean", "--out", str(tmp_path / "s")])
    assert (
        main(["share", "--from", str(tmp_path / "s"), "--strategy", "mean", "--out", str(tmp_path / "y")])
        == 2
    )
    assert "already shares its FFN" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("sharing", ["all", "group:2", "group:3"])
def test_share_layer_k_takes_the_kth_layer_of_every_group(large_base, tmp_path, sharing):
    """group:3 over 4 layers leaves a last group of one layer: layer:0 works, each group's first layer."""
    _, base = load_checkpoint(large_base)
    out = tmp_path / "shared"
    assert (
        main(
            [
                "share",
                "--from",
                str(large_base),
                "--strategy",
                "layer:0",
                "--sharing",
                sharing,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    config, state = load_checkpoint(out)
    for g in range(config.num_ffns):
        first = config.ffn_groups[g][0]
        torch.testing.assert_close(
            state[f"model.ffns.{g}.gate_proj.weight"], base[f"model.ffns.{first}.gate_proj.weight"]
        )
    assert (
        main(
            [
                "share",
                "--from",
                str(large_base),
                "--strategy",
                "mean",
                "--sharing",
                sharing,
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    config, state = load_checkpoint(tmp_path / "m")
    last = config.ffn_groups[-1]
    expected = torch.stack([base[f"model.ffns.{i}.up_proj.weight"] for i in last]).mean(0)
    torch.testing.assert_close(state[f"model.ffns.{config.num_ffns - 1}.up_proj.weight"], expected)


def test_share_layer_k_beyond_an_uneven_last_group_is_a_one_line_error(large_base, tmp_path, capsys):
    args = ["share", "--from", str(large_base), "--strategy", "layer:1", "--sharing", "group:3"]
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "must be 0..0; groups of 3 layers, the last of 1" in err and err.count("\n") == 1
    assert "IndexError" not in err and not (tmp_path / "x").exists()


def test_pretrain_cli_init_from_and_plot(helpers, shard_dir, large_base, tmp_path, capsys):
    main(["share", "--from", str(large_base), "--strategy", "mean", "--out", str(tmp_path / "shared")])
    recipe = helpers.write_recipe(tmp_path / "r.yaml", helpers.micro_recipe(shard_dir, tmp_path / "run"))
    args = [
        "pretrain",
        "--recipe",
        str(recipe),
        "--train.max_steps=2",
        "--init-from",
        str(tmp_path / "shared"),
    ]
    assert main([*args, "--log.tensorboard=true"]) == 0
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert "done: step 2" in capsys.readouterr().out
    first = next(r for r in read_metrics(tmp_path / "run") if "loss" in r)
    _, shared = load_checkpoint(tmp_path / "shared")
    model = MobiLlama(get_preset("micro"))
    model.load_state_dict(shared)
    from mobillama.data.loader import StepBatches, TokenSplit
    from mobillama.train.loop import lm_loss_sum

    batches = StepBatches(TokenSplit(shard_dir), micro_batch_size=4, grad_accum=2, seed=7).next_step()
    with torch.no_grad():
        expected = sum(float(lm_loss_sum(model, b)) for b in batches) / (8 * 16)
    assert first["loss"] == pytest.approx(expected, rel=1e-5)  # training started from the shared weights
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "q.png")]) == 2


def test_pretrain_cli_bad_input(helpers, shard_dir, tmp_path, capsys):
    def run(data, *extra):
        recipe = helpers.write_recipe(tmp_path / "r.yaml", helpers.micro_recipe(data, tmp_path / "run"))
        return main(["pretrain", "--recipe", str(recipe), *extra])

    assert run(tmp_path / "missing") == 2
    assert "data directory not found" in capsys.readouterr().err
    assert run(shard_dir, "--model.overrides.vocab_size=512") == 2
    assert "vocab_size 256 but the model has vocab_size 512" in capsys.readouterr().err
    assert run(shard_dir, "--optim.lrr=1") == 2
    assert "unknown recipe key 'optim.lrr'" in capsys.readouterr().err
    assert run(shard_dir, "--train.max_steps=many") == 2
    assert "'train.max_steps' must be int" in capsys.readouterr().err
    assert run(shard_dir, "--batch.global_batch_tokens=100") == 2
    assert "must be a multiple of" in capsys.readouterr().err
    assert run(shard_dir, "--init-from", str(tmp_path / "none")) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(SystemExit):
        main(["share", "--bogus=1"])  # only pretrain takes --key=value overrides


def test_share_keeps_dedicated_first_layers(large_base, tmp_path):
    """dedicated:1+group:3 over 4 layers: layer 0 keeps its FFN, layers 1-3 share one; the model built
    from the result runs each layer on the FFN the config names."""
    _, base = load_checkpoint(large_base)
    for strategy in ("mean", "aligned", "layer:1"):
        out = tmp_path / strategy.replace(":", "-")
        args = [
            "share",
            "--from",
            str(large_base),
            "--strategy",
            strategy,
            "--sharing",
            "dedicated:1+group:3",
        ]
        assert main([*args, "--out", str(out)]) == 0
        config, state = load_checkpoint(out)
        assert config.ffn_sharing == "dedicated:1+group:3" and config.num_ffns == 2
        for w in ("gate_proj", "up_proj", "down_proj"):
            torch.testing.assert_close(state[f"model.ffns.0.{w}.weight"], base[f"model.ffns.0.{w}.weight"])
        shared = state["model.ffns.1.up_proj.weight"]
        if strategy == "mean":
            expected = torch.stack([base[f"model.ffns.{i}.up_proj.weight"] for i in (1, 2, 3)]).mean(0)
            torch.testing.assert_close(shared, expected)
        if strategy == "layer:1":
            torch.testing.assert_close(shared, base["model.ffns.2.up_proj.weight"])
        model = MobiLlama(config)
        model.load_state_dict(state)
        assert [model.config.ffn_index(i) for i in range(4)] == [0, 1, 1, 1]


@pytest.mark.parametrize(
    "sharing, message",
    [("dedicated:1+group:4", "larger than the 3 layers it applies to"), ("none", "shares nothing")],
)
def test_share_refuses_a_sharing_that_does_not_fit(large_base, tmp_path, capsys, sharing, message):
    args = ["share", "--from", str(large_base), "--strategy", "mean", "--sharing", sharing]
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "x").exists()
