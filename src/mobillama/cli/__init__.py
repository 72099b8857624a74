"""The ``mobillama`` command: one entry point, one subcommand per pipeline stage.

Each module in this package registers the subcommands of one stage (``register(subparsers)``) and keeps
them thin: parse, call one library function, print. User mistakes surface as
:class:`~mobillama.errors.MobiLlamaError` and are printed as a single ``error:`` line (exit status 2).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mobillama.errors import MobiLlamaError

# Stage modules, in pipeline order; each defines register(subparsers).
STAGES = [
    "mobillama.cli.core",
    "mobillama.cli.demo",
    "mobillama.cli.data",
    "mobillama.cli.convert",
    "mobillama.cli.infer",
    "mobillama.cli.serve",
    "mobillama.cli.eval",
    "mobillama.cli.train",
    "mobillama.cli.sft",
    "mobillama.cli.vision",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mobillama",
        description="MobiLlama: small Llama-style language models with one FFN shared by every layer. "
        "Run 'mobillama COMMAND --help' for the options of a command.",
    )
    from mobillama import __version__

    parser.add_argument("--version", action="version", version=f"mobillama {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in STAGES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Commands that take recipe-style "--section.key=value" overrides get the unknown options as
    # args.overrides; for every other command they are the usual argparse error.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    try:
        result = args.func(args)
    except MobiLlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
