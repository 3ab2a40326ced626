"""The exceptions the CLI turns into a message and an exit status: `BgmatteError`, the one meant for people (one
line, exit 2; `OutputExists`, an output not replaced unasked, is one of them, which the commands word in their own
terms), `PartlyDone`, one of them raised after part of the work was written, and `Terminated`, a stop asked for
by a signal (exit 128 + its number)."""
from __future__ import annotations

import signal
from pathlib import Path


class BgmatteError(Exception):
    """A problem with the user's input or settings, worded for the user (name the file and the problem)."""


class OutputExists(BgmatteError):
    """An output that exists and is replaced only when asked: its message names the Python argument
    (``overwrite=True``), `on_command_line` the option (``--overwrite``), which the commands print instead."""

    def __init__(self, subject: str, to_do: str):
        super().__init__(f"{subject} (pass overwrite=True to {to_do})")
        self.subject, self.to_do = subject, to_do
        self.on_command_line = f"{subject} (pass --overwrite to {to_do})"

    def __reduce__(self):  # pickled (by a worker process) with the arguments it is made from, not its message
        return type(self), (self.subject, self.to_do)


def for_command_line(error: BgmatteError) -> str:
    """The message a command prints for ``error``: its own, worded for the command line where it has such a wording."""
    return getattr(error, "on_command_line", None) or str(error)


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
