"""`wmtrace materialize`: a patched buyer's full copy, rebuilt from the master and its patch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import api
from .common import JsonOpt, MasterOpt, RegistryOpt, emit, guarded, out


@guarded
def materialize(
    buyer: Annotated[str, typer.Argument(help="Buyer name (or id) issued with --store patch")],
    output: Annotated[Path, typer.Option("-o", "--output", help="File to write (a folder for a sharded master)")],
    master: MasterOpt = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a buyer's full copy from the master's weights and the buyer's patch, checked against the
    registered sha256 before it is renamed into place (on a mismatch nothing is written)."""
    reg = api.open_registry(registry)
    result = api.materialize(reg, buyer, output, master)
    if as_json:
        emit(result)
        return
    out.print(f"{result['file']}: copy of buyer {result['buyer']['name']!r} ({result['bytes']:,} bytes from a "
              f"{result['patch_bytes']:,}-byte patch), sha256 {result['sha256']} as registered")
