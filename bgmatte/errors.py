"""The exceptions the CLI turns into a message and an exit status: `BgmatteError`, the one meant for people (one
line, exit 2), `PartlyDone`, one of them raised after part of the work was written, and `Terminated`, a stop asked for
by a signal (exit 128 + its number)."""
from __future__ import annotations

import signal
from pathlib import Path


class BgmatteError(Exception):
    """A problem with the user's input or settings, worded for the user (name the file and the problem)."""


class PartlyDone(BgmatteError):
    """A batch that wrote some outputs and left inputs out: `written` maps each output kind to the files written,
    `left_out` lists the inputs that were not matted, so that a caller (the CLI) can say what exists."""

    def __init__(self, message: str, written: dict[str, list[Path]], left_out: list[Path]):
        super().__init__(message)
        self.written = written
        self.left_out = left_out


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the command is, as Ctrl-C's KeyboardInterrupt is: every path that finalizes
    outputs on Ctrl-C does so on these too."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
