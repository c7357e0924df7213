"""`wmtrace keys export-public`: the seller's public key, for buyers, arbiters and `wmtrace verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import api
from .common import RegistryOpt, group, guarded, out

app = group("Keys of the evidence: the seller's public key (export-public; the private half never leaves the "
            "registry) and an arbiter's key pair (arbiter).")


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


@app.command("arbiter")
@guarded
def arbiter(
    dest: Annotated[Path, typer.Option("--out", help="The arbiter's private key file to create (0600)")],
) -> None:
    """For an arbiter: create a key pair; give DEST.pub to the seller ('wmtrace evidence --seal-to DEST.pub'),
    keep DEST for 'wmtrace verify --arbiter-key DEST'."""
    public = api.new_arbiter_key(dest)
    out.print(f"created {dest} (0600, keep it) and {dest}.pub (give it to the seller): {public}")
