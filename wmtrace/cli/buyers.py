"""`wmtrace buyers`: the issued copies."""

from __future__ import annotations

from rich.table import Table

from .. import api
from ..evidence.statement import date
from .common import JsonOpt, MasterOpt, RegistryOpt, emit, guarded, pct, print_table


@guarded
def buyers(master: MasterOpt = None, registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """List issued buyer copies."""
    reg = api.open_registry(registry)
    rows = [b.public() for b in api.list_buyers(reg, master)]
    revoked = {m: reg.revocations(m) for m in {r["master"] for r in rows}}
    for r in rows:
        r["revoked"] = revoked[r["master"]].get(r["id"])  # {"at", "reason"} from the signed log, or None
    if as_json:
        emit({"buyers": rows})
        return
    table = Table("master", "id", "name", "agreement", "accuracy", "cosine", "sha256", "store", "file", "revoked")
    for r in rows:
        cosine = "-" if r["cosine"] is None else f"{r['cosine']:.5f}"
        table.add_row(r["master"], str(r["id"]), r["name"], pct(r["agreement"]), pct(r["accuracy"]), cosine,
                      (r["sha256"] or "")[:12], r["store"] or "", r["file"] or "",
                      f"{date(r['revoked']['at'])}: {r['revoked']['reason']}" if r["revoked"] else "")
    print_table(table)

