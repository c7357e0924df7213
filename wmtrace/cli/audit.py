"""`wmtrace audit verify|show`: the registry's signed, hash-chained log of every action."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from .. import api
from ..evidence.statement import date
from .common import JsonOpt, RegistryOpt, emit, group, guarded, out, print_table

app = group("The registry's audit log: every init, issue, trace, query, revoke and reveal, hash-chained and signed.")


@app.command("verify")
@guarded
def audit_verify(
    statements: Annotated[list[Path] | None, typer.Option(
        "--statement", help="A statement published from this registry (statement-N.json; repeat): the log must "
        "still hold the head it pinned (shows a log cut at its end)")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check every entry's hash, link and signature: name any edited, removed or reordered entry.
    Exit 0: intact; 1: not."""
    with api.open_registry(registry) as reg:
        info = api.verify_audit(reg, statements or [])
    if as_json:
        emit(info)
        raise typer.Exit(0 if info["ok"] else 1)
    for p in info["problems"]:
        out.print(Text.assemble(("FAIL", "bold red"), f"  {p}"))
    before = f" after {info['unsigned_before_chain']} earlier unsigned entries" if info["unsigned_before_chain"] else ""
    if info["ok"]:
        out.print(Text.assemble(("intact", "bold green"), f": {info['signed']} entries linked and signed by seller "
                                f"{info['seller']}{before}; head {info['head'][:16]}..., {info['statements']} "
                                "statement(s)"))
    else:
        if not info["signed"]:
            out.print(f"not signed yet: {info['entries']} entries from before the signed audit log; the chain "
                      "starts, committing to them, at the registry's next write")
        else:
            out.print(Text.assemble(("broken", "bold red"), f": {len(info['problems'])} problem(s) in "
                                    f"{info['entries']} entries"))
    raise typer.Exit(0 if info["ok"] else 1)


@app.command("show")
@guarded
def audit_show(
    limit: Annotated[int, typer.Option("--limit", min=1, help="The last N entries")] = 20,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The last entries, oldest first."""
    with api.open_registry(registry) as reg:
        entries = reg.audit_chain()[-limit:]
    if as_json:
        emit(entries)
        return
    table = Table(box=None, pad_edge=False)
    for col in ("seq", "date (UTC)", "action", "master", "detail", "hash"):
        table.add_column(col, overflow="fold")
    for e in entries:
        detail = ", ".join(f"{k}={_short(v)}" for k, v in e["detail"].items() if k not in ("public_key", "masters"))
        table.add_row(str(e["seq"]), date(e["at"]), e["action"], e["master"] or "-", detail,
                      (e["hash"] or "unsigned")[:16])
    print_table(table)


def _short(v) -> str:
    """A sha256 as its first 16 digits (enough to match; `--json` has them whole)."""
    return f"{v[:16]}..." if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v) else str(v)
