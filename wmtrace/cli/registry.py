"""`wmtrace registry backup|restore|migrate`: the keys are the one thing that must never be lost."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import api
from .common import JsonOpt, RegistryOpt, emit, group, guarded, out

app = group("Back up, restore or migrate the registry: its keys are the one thing that must never be lost.")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


@app.command("backup")
@guarded
def registry_backup(
    dest: Annotated[Path, typer.Argument(help="New (or empty) folder for the backup")],
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy the database, keys and masters to DEST, verified (keys against their fingerprints)."""
    with api.open_registry(registry) as reg:
        info = api.backup(reg, dest)
    if as_json:
        emit(info)
        return
    masters = ", ".join(f"{m['name']} (key {m['key_fingerprint']})" for m in info["masters"]) or "no master"
    out.print(f"backed up {reg.location} to {info['backup']}: {masters}, {info['buyers']} buyers, "
              f"{len(info['files'])} files, {_size(info['bytes'])}")
    out.print("it holds the secret keys: keep it where only you can read it, away from this machine")


@app.command("restore")
@guarded
def registry_restore(
    src: Annotated[Path, typer.Argument(help="A folder written by 'wmtrace registry backup'")],
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore a backup as the registry (a new or empty folder: a key is never overwritten)."""
    info = api.restore(src, registry)
    if as_json:
        emit(info)
        return
    masters = ", ".join(f"{m['name']} (key {m['key_fingerprint']})" for m in info["masters"]) or "no master"
    out.print(f"restored {info['source']} (taken {info['created']}) into {info['registry']}: {masters}, "
              f"{info['buyers']} buyers, {len(info['files'])} files, all verified")



@app.command("migrate")
@guarded
def registry_migrate(
    to: Annotated[str, typer.Option("--to", help="An empty registry: a folder or a postgresql:// URL")],
    storage: Annotated[str | None, typer.Option(
        "--storage", help="Where a new PostgreSQL registry keeps master files [default: $WMTRACE_STORAGE]")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy the registry (masters, keys, buyers, audit log, master files) into another backend, verified."""
    with api.open_registry(registry) as reg:
        info = api.migrate_registry(reg, to, storage=storage)
    if as_json:
        emit(info)
        return
    masters = ", ".join(f"{m['name']} (key {m['key_fingerprint']}, {m['buyers']} buyers)" for m in info["masters"])
    out.print(f"migrated {info['from']} to {info['to']}: {masters}; {info['buyers']} issued and {info['reserved']} "
              f"reserved buyers, {info['audit']} audit entries, {info['files']} files ({_size(info['bytes'])}); "
              "verified: counts, weights sha256, key fingerprints, buyers' sha256 and codewords, the seller key, "
              "the audit chain, commitments and statements")
