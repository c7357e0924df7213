"""`wmtrace revoke`: end a buyer's licence, in the signed audit log."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import api
from ..evidence.statement import date
from .common import JsonOpt, MasterOpt, RegistryOpt, emit, guarded, out


@guarded
def revoke(
    buyer: Annotated[str, typer.Argument(help="Buyer name or ID")],
    reason: Annotated[str, typer.Option("--reason", help="Why (a refund, a breach): it goes into the signed log")],
    master: MasterOpt = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Record that a buyer's licence ends now, in a signed audit entry. Their copy still traces to them:
    'trace' names them and says since when they were revoked."""
    with api.open_registry(registry) as reg:
        info = api.revoke(reg, buyer, reason, master)
    emit(info) if as_json else out.print(
        f"revoked {info['buyer']} (id {info['id']}) of master {info['master']} on {date(info['at'])}: {info['reason']}")
