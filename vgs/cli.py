"""`vgs` command line. Each subcommand lives in the module that does the work and exposes
`register(subparsers)`; the handler it sets returns an exit code.

User errors (`VGSError`, bad flags) print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vgs.errors import VGSError

# module paths that expose `register(subparsers)`
COMMAND_MODULES = [
    "vgs.commands.make_tiny",
    "vgs.eval.runner",
    "vgs.server",
    "vgs.eval.report",
    "value_models.collect",
    "value_models.rounds",
    "value_models.apo_vstar",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"vgs: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vgs", description="Test-time search and value-guided decoding on vLLM.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VGSError as exc:
        print(f"vgs: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vgs: interrupted; finished work is saved, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
