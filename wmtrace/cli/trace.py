"""`wmtrace trace`: name the buyer behind a leaked file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from .. import api
from ..evidence.statement import date
from .common import JsonOpt, MasterOpt, MaxFpOpt, RegistryOpt, emit, guarded, out


@guarded
def trace(
    file: Annotated[Path, typer.Argument(help="Leaked .safetensors / .onnx / checkpoint, or a folder")],
    master: MasterOpt = None,
    max_fp: MaxFpOpt = 1e-6,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Name the buyer behind a leaked model file (no model code needed)."""
    reg = api.open_registry(registry)
    result = api.trace(file, reg, master, max_fp)
    if as_json:
        emit(result.to_dict())
    else:
        print_trace(result)
    raise typer.Exit(result.exit_code)


def print_trace(r) -> None:
    colour = {"identified": "green", "colluders": "magenta", "no watermark": "yellow"}.get(r.verdict, "red")
    out.print(Text.assemble((r.verdict, f"bold {colour}"), f"  {r.file}"))
    if r.master:
        out.print(f"  master: {r.master}")
    for c in r.carriers:
        how = " by name and shape only" if c.get("found_by") == "name" else ""
        out.print(f"  carrier {c['carrier']} found as {c['found_as']}{how} (similarity {c['similarity']:.3f})")
    if r.colluders:
        out.print(f"  {r.reason}")
        for c in r.colluders:
            out.print(Text.assemble(
                "  accused: ", (c["name"], "bold"), f" (id {c['id']}): score {c['score']:.2f}, "
                f"probability that an innocent buyer scores this high <= {c['false_accusation_bound']:.2e}"
            ))
    elif r.buyer:
        out.print(Text.assemble("  buyer: ", (r.buyer["name"], "bold"), f" (id {r.buyer['id']})"))
        if r.buyer.get("revoked"):
            out.print(f"  revoked on {date(r.buyer['revoked']['at'])} ({r.buyer['revoked']['reason']}): still the "
                      "buyer this copy was sold to")
        if r.bit_errors is not None:
            out.print(
                f"  evidence: {r.bit_errors} of {r.bits - r.bits_missing} bits flipped, {r.bits_missing} missing; "
                f"{r.symbol_errors} symbol errors corrected, {r.erasures} erasures"
            )
        else:
            out.print(f"  evidence: {r.reason}")
        out.print(f"  probability that an unmarked model gives this verdict: <= {r.false_positive_probability:.2e}")
    elif r.reason:
        out.print(f"  {r.reason}")
    if r.queries is not None:
        out.print(f"  queries: {r.queries} answers read")

