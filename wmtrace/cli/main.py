"""The `wmtrace` application: one module per command (or group), assembled here.

Every command takes `--registry DIR|URL` (a folder or a postgresql:// URL; default: $WMTRACE_REGISTRY or
./registry) and `--json`.
"""

from __future__ import annotations

import typer

from . import (
    attack,
    audit,
    buyers,
    demo,
    edit_images,
    evidence,
    images,
    init,
    issue,
    keys,
    materialize,
    query,
    receipt,
    registry,
    revoke,
    serve,
    trace,
)
from .common import OneLineErrors

app = typer.Typer(
    cls=OneLineErrors,
    help="Per-buyer watermarks for neural network weights, and tracing of leaked copies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(init.init)
app.command()(issue.issue)
app.command()(trace.trace)
app.command()(query.query)
app.command("buyers")(buyers.buyers)
app.command()(materialize.materialize)
app.command()(demo.demo)
app.command()(serve.serve)
app.command()(revoke.revoke)
app.command()(evidence.evidence)
app.command()(evidence.verify)
app.command()(images.probes)
app.command("trace-images")(images.trace_images)
app.add_typer(attack.app, name="attack")
app.add_typer(audit.app, name="audit")
app.add_typer(edit_images.app, name="edit-images")
app.add_typer(keys.app, name="keys")
app.add_typer(receipt.app, name="receipt")
app.add_typer(registry.app, name="registry")


def main() -> None:  # pragma: no cover - console entry point
    app()
