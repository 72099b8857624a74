"""The mobillama command: help for every subcommand, info output, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mobillama.cli import build_parser, main


def _subcommand_parsers(parser):
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            yield name, sub
            if sub._subparsers is not None:
                for child, subsub in _subcommand_parsers(sub):
                    yield f"{name} {child}", subsub


def test_every_subcommand_and_option_has_help():
    parser = build_parser()
    names = []
    for name, sub in _subcommand_parsers(parser):
        names.append(name)
        assert sub.description, f"'{name}' has no description"
        for action in sub._actions:
            if action.dest != "help" and action.option_strings:
                assert action.help, f"option {action.option_strings} of '{name}' has no help"
    assert "info" in names


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        main(["info", "--help"])
    assert e.value.code == 0
    assert "PRESET_OR_CHECKPOINT" in capsys.readouterr().out


def test_info_json(capsys):
    assert main(["info", "mobillama-0.5b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"]["total"] == 534_865_920


def test_info_table(capsys):
    assert main(["info", "tiny"]) == 0
    assert "sharing saves" in capsys.readouterr().out


def test_user_error_is_one_line_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "mobillama", "info", "no-such-preset"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: 'no-such-preset' is neither a preset")
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
