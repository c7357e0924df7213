"""`wmtrace receipt export|sign|record`: a buyer's proof of what they were sold, and their signature on it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import api
from .common import JsonOpt, MasterOpt, RegistryOpt, emit, group, guarded, out

app = group("Receipts: the seller's signed statement of a buyer's copy, and the buyer's acknowledgement.")


@app.command("export")
@guarded
def receipt_export(
    buyer: Annotated[str, typer.Argument(help="Buyer name or ID")],
    dest: Annotated[Path, typer.Option("--out", help="File to write the receipt to")],
    master: MasterOpt = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a buyer's receipt (issue writes one beside each copy; this writes it again)."""
    with api.open_registry(registry) as reg:
        info = api.export_receipt(reg, buyer, dest, master)
    emit(info) if as_json else out.print(
        f"wrote the receipt of {info['buyer']} (id {info['id']}, statement {info['statement']}) to {dest}")


@app.command("sign")
@guarded
def receipt_sign(
    receipt: Annotated[Path, typer.Argument(help="The receipt (BUYER.receipt.json) that came with the copy")],
    key: Annotated[Path, typer.Option("--key", help="Your signing key file (0600; created if absent)")],
    copy: Annotated[Path | None, typer.Option("--copy", help="Your copy: its sha256 must be the receipt's")] = None,
    seller_key: Annotated[Path | None, typer.Option("--seller-key", help="The seller's public key")] = None,
    dest: Annotated[Path | None, typer.Option("--out", help="[default: beside the receipt, .ack.json]")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The buyer's side (no registry): check the receipt and sign it, acknowledging that copy."""
    info = api.sign_receipt(receipt, key, dest, copy, seller_key)
    if as_json:
        emit(info)
        return
    if info["key_created"]:
        out.print(f"created your signing key {info['key']} in {key} (0600): keep it, it signs for you")
    checked = "receipt and copy" if info["copy_checked"] else "receipt (pass --copy to check your copy too)"
    out.print(f"checked the {checked} against seller {info['seller']}; signed the acknowledgement of "
              f"{info['buyer']} (id {info['id']}) with key {info['key']}: {info['acknowledgement']}")


@app.command("record")
@guarded
def receipt_record(
    ack: Annotated[Path, typer.Argument(help="A buyer's signed acknowledgement (.ack.json)")],
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The seller's side: keep a buyer's acknowledgement (checked against their receipt); evidence bundles
    naming that buyer carry it."""
    with api.open_registry(registry) as reg:
        info = api.record_receipt(reg, ack)
    emit(info) if as_json else out.print(
        f"recorded the acknowledgement of {info['buyer']} (id {info['id']}), signed by key {info['key']}")
