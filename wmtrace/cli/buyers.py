"""`wmtrace buyers`: the issued copies."""

from __future__ import annotations

from rich.table import Table

from .. import api
from .common import JsonOpt, MasterOpt, RegistryOpt, emit, guarded, pct, print_table


@guarded
def buyers(master: MasterOpt = None, registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """List issued buyer copies."""
    reg = api.open_registry(registry)
    rows = [b.public() for b in api.list_buyers(reg, master)]
    if as_json:
        emit({"buyers": rows})
        return
    table = Table("master", "id", "name", "agreement", "accuracy", "cosine", "sha256", "store", "file")
    for r in rows:
        cosine = "-" if r["cosine"] is None else f"{r['cosine']:.5f}"
        table.add_row(r["master"], str(r["id"]), r["name"], pct(r["agreement"]), pct(r["accuracy"]), cosine,
                      (r["sha256"] or "")[:12], r["store"] or "", r["file"] or "")
    print_table(table)

