"""The `bgmatte` command: one module per subcommand, each parsing arguments and calling a library function.

Each subcommand module has `register(subparsers)`, which adds its parser and sets `func` to a
function taking the parsed arguments and returning an exit code. Errors meant for people
(`BgmatteError`) become one line on stderr and exit code 2; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from bgmatte.errors import BgmatteError

SUBCOMMANDS = ("video", "image", "webcam", "train", "eval", "export", "bench", "demo")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand whose module is present."""
    parser = argparse.ArgumentParser(
        prog="bgmatte",
        description="Real-time high-resolution background matting (BackgroundMattingV2).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        module_name = f"bgmatte.cli.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, run the subcommand and return its exit code; never a traceback unless --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    try:
        return int(args.func(args) or 0)
    except BgmatteError as exc:
        if debug:
            raise
        print(f"bgmatte {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"bgmatte {args.command}: interrupted", file=sys.stderr)
        return 130
