"""Errors that the CLI turns into a one-line message and exit code 2."""


class WmtraceError(Exception):
    """Bad input or an unusable environment: reported in one line, never as a traceback."""

    exit_code = 2


class BadInput(WmtraceError):
    """A file, argument or registry entry that wmtrace cannot use as given."""
