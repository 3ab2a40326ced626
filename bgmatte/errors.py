"""The one exception type meant for people: the CLI prints its message as one line and exits non-zero."""


class BgmatteError(Exception):
    """A problem with the user's input or settings, worded for the user (name the file and the problem)."""
