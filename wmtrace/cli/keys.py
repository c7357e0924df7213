"""`wmtrace keys export-public`: the seller's public key, for buyers, arbiters and `wmtrace verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import api
from .common import RegistryOpt, group, guarded, out

app = group("The seller's signing key (one per registry): only its public half ever leaves the registry.")


@app.command("export-public")
@guarded
def export_public(
    dest: Annotated[Path | None, typer.Option("--out", help="Write the PEM here [default: stdout]")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Print (or write) the registry's Ed25519 public key as PEM; publish it where buyers and arbiters can
    get it independently of any bundle."""
    with api.open_registry(registry) as reg:
        pem = api.export_public_key(reg)
        fingerprint = reg.public_key().fingerprint
    if dest is None:
        out.print(pem, end="")
        return
    dest.write_text(pem)
    out.print(f"wrote the seller public key {fingerprint} to {dest}")
