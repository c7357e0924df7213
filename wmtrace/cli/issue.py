"""`wmtrace issue`: buyer copies, each verified by tracing it before it is written."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .. import api
from .common import JsonOpt, MasterOpt, RegistryOpt, emit, err, fail, guarded, out, pct, print_table


def _read_names(path: Path) -> list[str]:
    try:
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        fail(f"{path}: cannot read buyer names ({getattr(e, 'strerror', None) or e})")


@guarded
def issue(
    buyers: Annotated[int | None, typer.Option(help="Number of buyer copies to issue")] = None,
    names: Annotated[Path | None, typer.Option(help="File with one buyer name per line")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder [default: ./buyers/MASTER]")] = None,
    master: MasterOpt = None,
    eval_samples: Annotated[
        int | None, typer.Option(help="Held-out samples to measure each copy's fidelity on (0: skip) [default: all]")
    ] = None,
    registry: RegistryOpt = None,
    store: Annotated[
        str, typer.Option(help="full: write each copy; patch: BUYER.wmpatch, only what differs from the master "
                      "('wmtrace materialize' rebuilds the copy)")
    ] = "full",
    ray: Annotated[
        str | None, typer.Option("--ray", metavar="ADDRESS",
                                 help="Issue on a Ray cluster: its head's HOST:PORT, or 'auto' to join "
                                 "$RAY_ADDRESS or the cluster last started on this host (else start one)")
    ] = None,
    ray_workers: Annotated[
        int | None, typer.Option(help="Ray actors, each holding the master [default: one per CPU of the cluster]")
    ] = None,
    allow_revealed: Annotated[bool, typer.Option(
        "--allow-revealed", help="Issue from a master whose key an evidence bundle revealed (its marks can be "
        "stripped by whoever holds that bundle)")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Turn the master into buyer copies, each carrying its buyer's ID, each verified by tracing it."""
    name_list = _read_names(names) if names is not None else None
    if buyers is None and name_list is None:
        fail("give --buyers N or --names FILE")
    api.check_issue(buyers, name_list, eval_samples)
    api.check_store(store)
    reg = api.open_registry(registry, create=True)
    if not reg.masters() and master is None and not as_json:
        err.print("no master registered yet: setting up the bundled Fashion-MNIST example")
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[done]}/{task.total:.0f}"),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err, disable=as_json,
    )
    tasks: dict[str, int] = {}

    def progress(done: int, n: int, step: int, steps: int, margin: float) -> None:
        count["done"] = done
        if not tasks:
            tasks["buyers"] = bar.add_task("buyers issued", total=n, info="", done=0)
        repairing = 0 < step < steps
        info = f"buyer {done + 1}: repair step {step}/{steps}, " if repairing else ""
        bar.update(tasks["buyers"], completed=done + (step / steps if repairing else 0), done=done,
                   info=f"{info}bit margin {margin:.2f}")

    count = {"done": 0, "of": len(name_list) if name_list is not None else buyers}
    try:
        with bar:
            issued = api.issue(reg, buyers, name_list, out_dir, master, progress=progress, eval_samples=eval_samples,
                               ray=ray, ray_workers=ray_workers, store=store, allow_revealed=allow_revealed)
    except KeyboardInterrupt:
        rest = "run the same command again: names already issued are skipped" if name_list is not None else \
            f"'--buyers {count['of'] - count['done']}' issues the rest"
        fail(f"interrupted after {count['done']} of {count['of']} copies, each of them written and registered; "
              f"{rest}", 130)
    skipped = [n for n in name_list or [] if n not in {b.name for b in issued}]
    if skipped and not as_json:
        err.print(f"{len(skipped)} of the names were issued before and are skipped")
    rows = [
        {"id": b.id, "name": b.name, "file": b.file, "sha256": b.sha256, "store": b.store, "agreement": b.agreement,
         "accuracy": b.accuracy, "cosine": b.cosine, "receipt": b.extra.get("receipt")}
        for b in issued
    ]
    if as_json:
        emit({"buyers": rows, "skipped": skipped})
        return
    print_table(_table(rows))
    if any(r["receipt"] for r in rows):
        out.print("each copy's receipt (BUYER.receipt.json: the signed statement and its Merkle proof) is beside it; "
                  "the statement-N.json of this run can be published or timestamped (statement-N.tsq)")


def _table(rows: list[dict]) -> Table:
    encoder = any(r["cosine"] is not None for r in rows)
    columns = ("cosine", "retrieval agreement") if encoder else ("agreement", "accuracy")
    table = Table("id", "name", *columns, "file", title=f"issued {len(rows)} buyer copies")
    for r in rows:
        first = "-" if r["cosine"] is None else f"{r['cosine']:.5f}"
        values = (first, pct(r["agreement"])) if encoder else (pct(r["agreement"]), pct(r["accuracy"]))
        table.add_row(str(r["id"]), r["name"], *values, r["file"])
    return table
