"""The ``mobillama convert`` command: help texts, output lines, and errors as one ``error:`` line (exit 2)."""

from __future__ import annotations

import pytest

from mobillama.cli import main


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_convert_help_lists_subcommands(capsys):
    text = _help(capsys, "convert")
    for sub in ("from-hf", "to-llama", "to-gguf"):
        assert sub in text


@pytest.mark.parametrize(
    ("sub", "must_mention"),
    [
        (
            "from-hf",
            [
                "SRC",
                "OUT",
                "--collapse",
                "layer:K",
                "mean",
                "--dtype",
                "--overwrite",
                "weights_only",
                "num_key_value_heads",
                "inv_freq",
            ],
        ),
        ("to-llama", ["CKPT", "OUT", "--dtype", "--overwrite", "LlamaForCausalLM", "once per layer"]),
        (
            "to-gguf",
            ["CKPT", "OUT.gguf", "--type", "f16", "q8_0", "q4_0", "--overwrite", "PER LAYER", "alias"],
        ),
    ],
)
def test_subcommand_help_explains_every_option(capsys, sub, must_mention):
    text = " ".join(_help(capsys, "convert", sub).split())  # argparse wraps lines
    for word in must_mention:
        assert word in text, word


def test_every_convert_option_has_help():
    import argparse

    from mobillama.cli import build_parser

    def subparsers(parser):
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    convert = subparsers(build_parser())["convert"]
    for name, parser in subparsers(convert).items():
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"convert {name}: {action.dest} has no help"


def test_from_hf_then_exports_through_the_cli(tmp_path, rel, capsys):
    original = rel.stock_llama(shared=True)
    src = rel.write_release(
        tmp_path / "release", rel.release_state(original), rel.release_config(original), fmt="bin"
    )
    assert main(["convert", "from-hf", str(src), str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "notice: config says num_key_value_heads 2" in out and "ffn_sharing all" in out
    assert "notice: no tokenizer files" in out
    assert main(["convert", "to-llama", str(tmp_path / "ckpt"), str(tmp_path / "llama")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert (
        main(["convert", "to-gguf", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    )
    out = capsys.readouterr().out
    assert "m.gguf" in out and "Q8_0" in out and "notice: no tokenizer" in out


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["convert", "from-hf", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: source not found") and err.count("\n") == 1
    assert main(["convert", "to-gguf", str(tmp_path / "missing"), str(tmp_path / "m.gguf")]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint not found")
    with pytest.raises(SystemExit) as info:  # argparse rejects an unknown --type before any work
        main(["convert", "to-gguf", str(tmp_path), str(tmp_path / "m.gguf"), "--type", "q2_k"])
    assert info.value.code == 2
