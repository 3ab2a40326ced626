"""The `bgmatte` command: one module per subcommand, each parsing arguments and calling a library function.

Each subcommand module has `register(subparsers)`, which adds its parser with `subparsers.add_parser` (a
`Subcommands`) and sets `func` to a function taking the parsed arguments and returning an exit code; it may
also set `log_level`, the least severe records shown without --debug (default WARNING; `webcam` shows its INFO
progress). Errors meant for people (`BgmatteError`) become one line on stderr and exit code 2; `--debug` shows
the traceback instead. SIGTERM and SIGHUP (a job scheduler, `kill`, a closed terminal) stop a command as
Ctrl-C does, so that its outputs are finalized and its temporary files removed.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

from bgmatte import __version__
from bgmatte.errors import BgmatteError, Terminated, for_command_line

SUBCOMMANDS = ("video", "image", "webcam", "train", "eval", "export", "bench", "demo")


class Subcommands:
    """What each subcommand module's `register` adds its parser to: argparse's `add_subparsers()` object, whose one
    public method is `add_parser`, and the parsers made through it kept by name (aliases too), since argparse has
    no public way to look a subcommand's parser up again."""

    def __init__(self, subparsers: Any) -> None:  # what add_subparsers() returns
        self._add = subparsers.add_parser
        self.parsers: dict[str, argparse.ArgumentParser] = {}

    def add_parser(self, name: str, **kwargs: object) -> argparse.ArgumentParser:
        """`add_parser` of argparse's sub-parsers object, the parser it returns recorded under each of its names."""
        parser = self._add(name, **kwargs)
        for each in (name, *kwargs.get("aliases", ())):
            self.parsers[each] = parser
        return parser


def build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser with every subcommand whose module is present, and those subcommands' parsers by name
    (for `main` to say an unknown argument under its command's usage)."""
    parser = argparse.ArgumentParser(
        prog="bgmatte",
        description="Real-time high-resolution background matting (BackgroundMattingV2).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"bgmatte {__version__}")
    subcommands = Subcommands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    for name in SUBCOMMANDS:
        module_name = f"bgmatte.cli.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(subcommands)
    return parser, subcommands.parsers


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand whose module is present."""
    return build_parsers()[0]


class _OneLineHandler(logging.Handler):
    """Log records as one line each on the current stderr, past any progress bar: INFO as a plain progress
    line, other levels named. A warning repeated more than a few times (a per-frame one) is shown three
    times, then counted silently; progress lines are always shown."""

    def __init__(self, command: str, debug: bool, level: int = logging.WARNING):
        super().__init__(logging.DEBUG if debug else level)
        self.prefix = f"bgmatte {command}"
        self.debug = debug
        self.seen: dict[tuple[str, object], int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            key = (record.name, record.getMessage() if record.msg == "%s" else record.msg)
            count = self.seen[key] = self.seen.get(key, 0) + 1
            quiet = record.levelno >= logging.WARNING and not self.debug
            if count > 3 and quiet:
                return
            lines = record.getMessage().strip().splitlines() or [""]
            level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
            text = f"{self.prefix}: {level}{lines[0]}"
            if count == 3 and quiet:
                text += " (further ones like it are not shown)"
            if self.debug and record.exc_info:
                text = self.format(record)
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


def configure_logging(command: str, debug: bool = False, level: int = logging.WARNING) -> Callable[[], None]:
    """Send the package's log records from `level` up (and Python warnings) to stderr as one-line messages,
    through one handler; returns an undo.

    Warnings show by default; --debug shows everything, tracebacks included.
    """
    package = logging.getLogger("bgmatte")
    handler = _OneLineHandler(command, debug, level)
    previous_level = package.level
    package.addHandler(handler)
    if package.getEffectiveLevel() > handler.level:
        package.setLevel(handler.level)
    previous_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        text = str(message).strip()
        logging.getLogger("bgmatte.warnings").warning("%s", text.splitlines()[0] if text else category.__name__)

    warnings.showwarning = show

    def undo() -> None:
        package.removeHandler(handler)
        package.setLevel(previous_level)
        if warnings.showwarning is show:
            warnings.showwarning = previous_show

    return undo


def stop_on_termination() -> Callable[[], None]:
    """Turn SIGTERM and SIGHUP into `Terminated` in the main thread while a command runs (where they are not
    handled already); returns an undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def handle(signum: int, frame: object) -> None:
        raise Terminated(signum)

    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) == signal.SIG_DFL:
            previous[number] = signal.signal(number, handle)

    def undo() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    return undo


def _quiet_opencv() -> None:
    """OpenCV prints its own warnings and errors to stderr (a TIFF variant it cannot read; a truncated BMP, GIF or
    PPM, whose decoder's failure it logs as '[ERROR:0@...] ... imdecode_'), and its FFmpeg its errors (a video file
    used as the webcam: 'moov atom not found'), ahead of the one line that says what went wrong; every such failure
    reaches bgmatte as an exception or an empty result, which it reports itself. --debug lets them through. OpenCV
    reads FFmpeg's log level once, when it first opens a video: here, before any; a level the user set is kept."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    try:
        import cv2.utils.logging as opencv_logging
    except ImportError:  # pragma: no cover - an OpenCV build without it
        return
    opencv_logging.setLogLevel(opencv_logging.LOG_LEVEL_SILENT)


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, run the subcommand and return its exit code; never a traceback unless --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv = [a for a in argv if a != "--debug"]
    parser, commands = build_parsers()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # after the command, said by it under its usage (the top level's lists none of its options)
        before = argv[:argv.index(args.command)]
        owner = parser if any(token in before for token in unknown) else commands[args.command]
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.debug = debug
    undo_logging = configure_logging(args.command, debug, getattr(args, "log_level", logging.WARNING))
    undo_signals = stop_on_termination()
    if not debug:
        _quiet_opencv()
    try:
        return int(args.func(args) or 0)
    except BgmatteError as exc:
        if debug:
            raise
        print(f"bgmatte {args.command}: error: {for_command_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if debug:
            raise
        if isinstance(exc, Terminated):
            print(f"bgmatte {args.command}: terminated ({exc})", file=sys.stderr)
            return 128 + exc.signum
        print(f"bgmatte {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        undo_signals()
        undo_logging()
