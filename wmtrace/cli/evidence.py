"""`wmtrace evidence` and `wmtrace verify`: an accusation a third party can check, and the check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from .. import api
from .common import JsonOpt, MasterOpt, MaxFpOpt, RegistryOpt, emit, guarded, out, print_table


@guarded
def evidence(
    leak: Annotated[Path, typer.Argument(help="The leaked .safetensors / .onnx / checkpoint, or a folder")],
    dest: Annotated[Path, typer.Option("--out", help="A new (or empty) folder for the bundle")],
    master: MasterOpt = None,
    max_fp: MaxFpOpt = 1e-6,
    seal_to: Annotated[Path | None, typer.Option(
        "--seal-to", help="An arbiter's public key file ('wmtrace keys arbiter'): the master's key is readable by "
        "that arbiter alone")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Trace LEAK and write the evidence bundle anyone can check with 'wmtrace verify' and the seller's
    public key. It reveals that master's key to whoever holds the bundle, or with --seal-to to one arbiter
    alone (README: Evidence a third party can check)."""
    with api.open_registry(registry) as reg:
        manifest = api.evidence(reg, leak, dest, master, max_fp, seal_to)
    if as_json:
        emit({"bundle": str(dest), **{k: manifest[k] for k in ("verdict", "master", "accused", "leak", "seller",
                                                               "sealed_to")},
              "files": sorted(manifest["files"]), "result": manifest["result"]})
        return
    out.print(Text.assemble(("evidence", "bold green"), f"  {dest}: {manifest['verdict']} "
                            f"{manifest['accused']} of master {manifest['master']}, leak sha256 "
                            f"{manifest['leak']['sha256'][:16]}..., signed by seller {manifest['seller']}"))
    out.print(f"  check it: wmtrace verify {dest} {leak} --public-key seller.pem "
              "(the public key from 'wmtrace keys export-public', obtained independently of the bundle)")
    who = "the arbiter whose key it is sealed to" if seal_to else "whoever holds it"
    out.print(f"  it reveals the key of master {manifest['master']} to {who}: new copies come from a new registration")


@guarded
def verify(
    bundle: Annotated[Path, typer.Argument(help="A folder written by 'wmtrace evidence'")],
    leak: Annotated[Path, typer.Argument(help="The leaked file the bundle is about")],
    public_key: Annotated[Path, typer.Option("--public-key", help="The seller's public key (PEM or 64 hex digits), "
                                             "obtained independently of the bundle")],
    arbiter_key: Annotated[Path | None, typer.Option("--arbiter-key", help="The arbiter's private key file, for a "
                                                     "bundle sealed to them")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check an evidence bundle with no registry: signatures, Merkle proofs, commitments, the audit chain,
    and the extraction re-run from what the bundle reveals. Exit 0: verified; 1: rejected, or incomplete (a
    bundle sealed to an arbiter, checked without --arbiter-key)."""
    v = api.verify(bundle, leak, public_key, arbiter_key)
    if as_json:
        emit(v.to_dict())
        raise typer.Exit(0 if v.ok else 1)
    table = Table(box=None, pad_edge=False, show_header=True, expand=False)
    for col in ("", "check", "found"):
        table.add_column(col, overflow="fold")
    for c in v.checks:
        unchecked = c.detail.startswith("not checked")
        mark = Text("ok", "green") if c.ok else Text("not checked", "yellow") if unchecked else Text("FAIL", "bold red")
        table.add_row(mark, c.name, c.detail)
    print_table(table)
    if v.ok:
        names = ", ".join(f"{a['name']} (id {a['id']})" for a in v.accused)
        out.print(Text.assemble(("verified", "bold green"), f": the leak names {names}; every check passed"))
    elif v.verdict == "incomplete":
        out.print(Text.assemble(("incomplete", "bold yellow"), f": every check run passed; {len(v.failed)} need the "
                                "key sealed for the arbiter (--arbiter-key)"))
    else:
        out.print(Text.assemble(("rejected", "bold red"), f": {v.failed[0]} failed "
                                f"({len(v.failed)} of {len(v.checks)} checks)"))
    raise typer.Exit(0 if v.ok else 1)
