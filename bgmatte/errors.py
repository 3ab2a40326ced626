"""The exceptions the CLI turns into a message and an exit status: `BgmatteError`, the one meant for people (one
line, exit 2), and `Terminated`, a stop asked for by a signal (exit 128 + its number)."""
import signal


class BgmatteError(Exception):
    """A problem with the user's input or settings, worded for the user (name the file and the problem)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the command is, as Ctrl-C's KeyboardInterrupt is: every path that finalizes
    outputs on Ctrl-C does so on these too."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
