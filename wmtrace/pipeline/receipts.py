"""Receipts, both sides: the seller exports one and records a buyer's acknowledgement; the buyer checks
the receipt against the copy they hold and signs it (`wmtrace receipt sign`, no registry needed).

A buyer signs only a receipt that checks out: the statement signed by the seller key they were given,
their leaf in its Merkle tree, and (with the copy) the copy's sha256 equal to the leaf's. The buyer's
key is theirs: a 0600 file of 64 hex digits, created on first use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..coding import keys
from ..errors import BadInput
from ..evidence import seal, statement
from ..evidence.signing import PublicKey, SigningKey
from ..registry import Registry
from .evidence import leak_sha256, write_document
from .patches import find_buyer

MAX_RECEIPT = 64 << 20  # a receipt holds one statement and one proof: kilobytes


def read_document(path: str | os.PathLike, what: str) -> dict:
    """A JSON document (receipt, acknowledgement, public key) read with a size bound; one-line errors."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_RECEIPT:
            raise BadInput(f"{path}: larger than any {what} ({path.stat().st_size} bytes)")
        doc = json.loads(path.read_bytes())
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: not a {what} (not JSON: {e})") from e
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: not a {what}")
    return doc


def read_public_key(path: str | os.PathLike) -> PublicKey:
    path = Path(path)
    try:
        return PublicKey.from_pem(path.read_bytes(), str(path))
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})") from e


def buyer_key(path: str | os.PathLike) -> tuple[SigningKey, bool]:
    """The buyer's signing key from its 0600 file, created when absent; (key, created)."""
    path = Path(path)
    if path.exists():
        return SigningKey(keys.read(path)), False
    keys.write(path, SigningKey.generate().seed)
    return SigningKey(keys.read(path)), True


def sign(receipt_path: str | os.PathLike, key_path: str | os.PathLike, out: str | os.PathLike | None = None,
         copy: str | os.PathLike | None = None, seller: str | os.PathLike | None = None) -> dict:
    """Check the receipt (and the copy, when given), then write the buyer's signed acknowledgement to `out`
    (default: beside the receipt, `.ack.json`). Returns what was done."""
    r = read_document(receipt_path, "wmtrace receipt")
    given = read_public_key(seller) if seller is not None else None
    try:
        carried = PublicKey(bytes.fromhex(str(r.get("seller_public_key"))))
    except ValueError as e:
        raise BadInput(f"{receipt_path}: the receipt carries no readable seller key") from e
    if given is not None and given.raw != carried.raw:
        raise BadInput(f"{receipt_path}: signed by key {carried.fingerprint}, not the seller's {given.fingerprint}")
    problems = statement.check_receipt(r, given or carried)
    if problems:
        raise BadInput(f"{receipt_path}: {problems[0]}; not signed")
    if copy is not None and leak_sha256(copy)[0] != r["leaf"]["sha256"]:
        raise BadInput(f"{copy}: its sha256 is not the one the receipt states for this buyer; not signed")
    key, created = buyer_key(key_path)
    ack = statement.acknowledge(r, key)
    out = Path(out) if out is not None else Path(receipt_path).with_name(
        Path(receipt_path).name.removesuffix(".json").removesuffix(".receipt") + ".ack.json")
    write_document(out, ack)
    return {"acknowledgement": str(out), "buyer": r["leaf"]["name"], "id": r["leaf"]["id"],
            "master": r["leaf"]["master"], "statement": r["statement"]["number"], "key": key.public.fingerprint,
            "key_created": created, "copy_checked": copy is not None, "seller": carried.fingerprint}


def export(reg: Registry, buyer: str | int, out: str | os.PathLike, master: str | None = None) -> dict:
    """Write a buyer's receipt (making the statement first if their run stopped before it)."""
    b = find_buyer(reg, buyer, master)
    r = reg.receipts(b.master, [b.id]).get(b.id)
    if r is None:
        reg.make_statement(b.master)
        r = reg.receipts(b.master, [b.id])[b.id]
    write_document(Path(out), r)
    return {"receipt": str(out), "buyer": b.name, "id": b.id, "master": b.master, "statement": r["statement"]["number"]}


def revoke(reg: Registry, buyer: str | int, reason: str, master: str | None = None) -> dict:
    """End a buyer's licence in a signed entry (`Ledger.revoke`); their copy still traces to them."""
    if not reason.strip():
        raise BadInput("give the reason for the revocation (it goes into the signed log)")
    b = find_buyer(reg, buyer, master)
    entry = reg.revoke(b.master, b.id, reason.strip())
    return {"buyer": b.name, "id": b.id, "master": b.master, "reason": reason.strip(), "at": entry["at"],
            "entry": entry["hash"]}


def record(reg: Registry, ack_path: str | os.PathLike) -> dict:
    """Keep a buyer's acknowledgement in the registry (checked against their receipt first)."""
    ack = read_document(ack_path, "wmtrace acknowledgement")
    r = reg.record_ack(ack)
    return {"buyer": r["leaf"]["name"], "id": r["leaf"]["id"], "master": r["leaf"]["master"],
            "key": PublicKey(bytes.fromhex(ack["buyer_public_key"])).fingerprint}


def new_arbiter_key(path: str | os.PathLike) -> str:
    """An arbiter's X25519 key: the private half in `path` (0600, never overwritten), the public half in
    `path`.pub (64 hex digits) for the seller's `evidence --seal-to`."""
    private, public = seal.new_key()
    keys.write(path, private)
    Path(f"{path}.pub").write_text(public.hex() + "\n")
    return public.hex()


def read_arbiter_public(path: str | os.PathLike) -> bytes:
    try:
        raw = bytes.fromhex(Path(path).read_text().strip())
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})") from e
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise BadInput(f"{path}: not an arbiter's public key (64 hex digits, from 'wmtrace keys arbiter')")
    return raw


def read_arbiter_private(path: str | os.PathLike) -> bytes:
    return keys.read(path)  # 0600 enforced, 32 bytes
