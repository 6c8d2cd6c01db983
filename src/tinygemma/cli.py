"""The `tinygemma` command: one sub-command per pipeline stage.

Each stage module owns its sub-commands through a `register(subparsers)` function that adds them and sets
`func`; this file only gathers them and turns `UserError` (bad input) into one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tinygemma.errors import UserError

# Modules that register sub-commands, in the order they appear in `tinygemma --help`.
COMMAND_MODULES = [
    "tinygemma.data",  # prepare
    "tinygemma.train",  # train
    "tinygemma.pipeline",  # run
    "tinygemma.generate",  # generate, eval
    "tinygemma.checkpoint",  # export
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinygemma",
        description="Pre-train Gemma 3 270M from scratch on TinyStories.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UserError as e:
        print(f"tinygemma {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied, ...: the user's environment, not a bug
        print(f"tinygemma {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tinygemma {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
