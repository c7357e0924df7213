"""What can go wrong, in library terms. The CLI turns each into one `error:` line and an exit code
(`wmtrace.cli.common.guarded`, the one place that does); Python callers catch `WmtraceError`.

    WmtraceError
      BadInput          a file, argument or registry entry that cannot be used as given
        BadArgument     one argument out of range: names the parameter, which the CLI shows as its flag
        CorruptFile     a file that is damaged, truncated, or built to harm the reader
        UnknownMaster   no such master in the registry
        TargetFailed    a queried model (endpoint or file run as a black box) failed or answered nonsense
      SelfCheckFailed   an issued copy did not trace back to its buyer: it is never written or shipped
      InternalError     a broken invariant: a bug, to be reported
"""


class WmtraceError(Exception):
    """Reported in one line, never as a traceback."""

    exit_code = 2


class BadInput(WmtraceError):
    """A file, argument or registry entry that wmtrace cannot use as given."""


class BadArgument(BadInput):
    """An argument out of range. `param` is the Python parameter's name ("eval_samples"); the message
    reads "eval_samples must be 0 or more" here and "--eval-samples must be 0 or more" on the CLI."""

    def __init__(self, param: str, problem: str):
        self.param, self.problem = param, problem
        super().__init__(f"{param} {problem}")

    def __reduce__(self):  # pickled as its two arguments: it crosses from Ray workers to the driver
        return (type(self), (self.param, self.problem))

    def flag(self) -> str:
        return f"--{self.param.replace('_', '-')} {self.problem}"


class CorruptFile(BadInput):
    """A damaged, truncated or hostile file: refused before anything is allocated from its claims."""


class UnknownMaster(BadInput):
    """The registry holds no master of that name (or none at all)."""


class TargetFailed(BadInput):
    """A black-box target could not be queried (unreachable, timed out, refused) or answered something
    that is not an answer (wrong shape, NaN, not JSON). Nothing is concluded from a failed session."""


class SelfCheckFailed(WmtraceError):
    """A copy that would not name its own buyer when traced; it is not written."""


class InternalError(WmtraceError):
    """An invariant of wmtrace itself failed."""

    exit_code = 3


def first_line(e: BaseException) -> str:
    """First line of a foreign exception (torch, onnx, zip), short enough for a one-line report."""
    lines = str(e).strip().splitlines()
    first = lines[0].split(". ")[0] if lines else type(e).__name__
    return first[:160]
