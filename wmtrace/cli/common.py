"""What every command shares: consoles, options, JSON output, and the one place errors become exit codes.

Exit codes: 0 success / buyer identified, 1 no buyer identified, 2 bad input (usage errors included),
3 an internal error, 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from typing import Annotated

import typer
import typer.core
from rich.console import Console
from rich.text import Text

from ..errors import BadArgument, WmtraceError

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_errors

# User strings (paths, names) are never read as Rich markup: styles are given as Text, not "[tags]".
out = Console(soft_wrap=True, markup=False, highlight=False)
err = Console(stderr=True, markup=False, highlight=False)

RegistryOpt = Annotated[
    str | None, typer.Option("--registry", help="Registry folder or postgresql:// URL "
                             "[default: $WMTRACE_REGISTRY or ./registry]")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout")]
MasterOpt = Annotated[str | None, typer.Option("--master", help="Registered master [default: the only one]")]
MaxFpOpt = Annotated[
    float, typer.Option("--max-false-positive", help="Accuse only below this false-accusation probability")
]


class _Notes(logging.Handler):
    """What the library logs on logger "wmtrace" (e.g. an upgraded registry starting its signed audit log),
    as one `note:` line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        err.print(Text.assemble(("note:", "yellow"), f" {record.getMessage()}"), soft_wrap=True)


if not any(isinstance(h, _Notes) for h in logging.getLogger("wmtrace").handlers):
    logging.getLogger("wmtrace").addHandler(_Notes())


def fail(message: str, code: int = 2) -> None:
    err.print(Text.assemble(("error:", "red"), f" {message}"), soft_wrap=True)
    raise typer.Exit(code)


def guarded(fn):
    """One line and an exit code for any failure; a traceback only with WMTRACE_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except BadArgument as e:  # the library names the parameter; the user typed its flag
            fail(e.flag(), e.exit_code)
        except WmtraceError as e:
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted; nothing half-written was kept", 130)
        except OSError as e:
            if os.environ.get("WMTRACE_DEBUG"):
                raise
            where = f"{e.filename}: " if e.filename else ""
            fail(f"{where}{e.strerror or e}")
        except Exception as e:  # noqa: BLE001 - the promise is one line, never a traceback
            if os.environ.get("WMTRACE_DEBUG"):
                raise
            fail(f"unexpected {type(e).__name__}: {e} (set WMTRACE_DEBUG=1 for details)")

    return wrapper


def emit(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_table(table) -> None:
    """A table at its natural width: wrapped to a terminal, whole into a pipe or file (not 80 columns)."""
    if out.is_terminal:
        out.print(table)
        return
    saved = out._width  # rich caps a print's width at the console's: widen the console for this one
    out.width = max(20, out.measure(table, options=out.options.update(width=10_000)).maximum)
    try:
        out.print(table)
    finally:
        out._width = saved


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


class OneLineErrors(typer.core.TyperGroup):
    """Usage errors (an unknown option, `--buyers abc`) as one `error:` line and exit code 2, like
    every other error, instead of a boxed usage panel."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click_errors.NoArgsIsHelpError as e:
            err.print(e.ctx.get_help() if e.ctx else str(e))
            code = 2
        except click_errors.ClickException as e:
            command = f" (see 'wmtrace {e.ctx.command_path.partition(' ')[2]} --help')".replace("  ", " ") \
                if getattr(e, "ctx", None) is not None else ""
            err.print(Text.assemble(("error:", "red"), f" {e.format_message()}{command}"), soft_wrap=True)
            code = e.exit_code
        except typer.Abort:
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)



def group(help: str, **kwargs) -> typer.Typer:
    """A command group with wmtrace's settings (no pretty tracebacks: errors are one line)."""
    return typer.Typer(help=help, no_args_is_help=True, pretty_exceptions_enable=False, **kwargs)


def derived(run, name: str, doc: str, signature) -> object:
    """A command built from a declaration (an attack's parameters): `run` under the one error handler,
    with the `inspect.Signature` typer reads its options from."""
    run.__name__, run.__doc__ = name, doc
    wrapped = guarded(run)
    wrapped.__signature__ = signature
    wrapped.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    return wrapped
