"""Statements, receipts and acknowledgements: what the seller publishes, what each buyer keeps.

A **statement** is the seller's signed, dated claim "these buyers were issued these copies of this
master, whose key was committed to then": the Merkle root over the buyers' leaves, the master's key
commitment, and the audit chain's head (so a published statement pins the log before it). A **receipt**
is one buyer's leaf, its Merkle proof and the statement: the buyer can check that the copy they hold is
the one the seller recorded. An **acknowledgement** is the buyer's own signature over their receipt
(`wmtrace receipt sign`): the seller can later show that the buyer received that copy.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from . import merkle
from .signing import PublicKey, SigningKey, document_hash

STATEMENT, RECEIPT, ACK = "wmtrace/statement", "wmtrace/receipt", "wmtrace/acknowledgement"
VERSION = 1


def leaf(master: str, buyer_id: int, name: str, sha256: str | None, codeword_commitment: str) -> dict:
    """What the tree commits to per buyer: who, which copy (its sha256), and the codeword, hidden."""
    return {"master": master, "id": int(buyer_id), "name": name, "sha256": sha256, "codeword": codeword_commitment}


def date(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="seconds")


def build(key: SigningKey, master: dict, leaves: list[dict], number: int, head: dict,
          at: float | None = None) -> tuple[dict, list[list[bytes]]]:
    """The signed statement over `leaves` (in ID order) and its tree. `master`: name, weights_sha256,
    key_commitment and the audit entry that committed the key (`committed_at`, `committed_in`); `head`:
    the chain's last entry (seq, hash) when the statement was made."""
    tree = merkle.levels([merkle.leaf_hash(x) for x in leaves])
    at = time.time() if at is None else at
    doc = {"type": STATEMENT, "version": VERSION, "seller": key.public.fingerprint, "number": number,
           "master": master, "buyers": len(leaves), "ids": [x["id"] for x in leaves[:1] + leaves[-1:]],
           "root": tree[-1][0].hex(), "at": at, "date": date(at), "chain_head": head}
    return key.sign_document(doc), tree


def receipt(statement: dict, tree: list[list[bytes]], leaves: list[dict], index: int, public: PublicKey) -> dict:
    return {"type": RECEIPT, "version": VERSION, "statement": statement, "leaf": leaves[index],
            "proof": merkle.proof(tree, index), "seller_public_key": public.raw.hex()}


def check_receipt(r: dict, public: PublicKey) -> list[str]:
    """What is wrong with a receipt against the seller's key (empty: nothing)."""
    if not isinstance(r, dict) or r.get("type") != RECEIPT:
        return ["not a wmtrace receipt"]
    problems = []
    s, leaf = _dict(r.get("statement")), _dict(r.get("leaf"))  # a hostile file's other shapes: problems, not errors
    if not public.verify_document(s):
        problems.append("the statement's signature is not the seller's")
    if not merkle.verify(r.get("leaf"), r.get("proof") or [], str(s.get("root"))):
        problems.append("the buyer's leaf is not in the statement's Merkle tree")
    if leaf.get("master") != _dict(s.get("master")).get("name"):
        problems.append("the leaf names another master than the statement")
    return problems


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def acknowledge(r: dict, buyer: SigningKey, at: float | None = None) -> dict:
    """The buyer's signature over their receipt (its hash, leaf and statement hash)."""
    at = time.time() if at is None else at
    doc = {"type": ACK, "version": VERSION, "receipt": document_hash(r), "statement": document_hash(r["statement"]),
           "leaf": r["leaf"], "buyer_public_key": buyer.public.raw.hex(), "at": at, "date": date(at)}
    return buyer.sign_document(doc)


def check_ack(ack: dict, r: dict, buyer_public: PublicKey | None = None) -> list[str]:
    """What is wrong with an acknowledgement of receipt `r` (signed by `buyer_public` when given, else by
    the key it carries: that key is only the buyer's if the seller recorded it at the sale)."""
    if not isinstance(ack, dict) or ack.get("type") != ACK:
        return ["not a wmtrace acknowledgement"]
    if not isinstance(r, dict):
        return ["not a wmtrace receipt"]
    try:
        carried = PublicKey(bytes.fromhex(str(ack.get("buyer_public_key"))))
    except ValueError:
        return ["the acknowledgement carries no readable buyer key"]
    problems = []
    if buyer_public is not None and carried.raw != buyer_public.raw:
        problems.append("signed by another key than the buyer's")
    if not carried.verify_document(ack):
        problems.append("the buyer's signature does not verify")
    if ack.get("receipt") != document_hash(r) or ack.get("leaf") != r.get("leaf"):
        problems.append("it acknowledges another receipt")
    return problems


def check_pinned(doc: dict, entries: list[dict], public: PublicKey) -> list[str]:
    """What is wrong with a log (`entries`, in order) against a statement published from it: the statement
    must be the seller's, be recorded in the log, and the entry it pinned as the head must still be there,
    unchanged. This is what shows a log cut at its end, which the chain alone cannot."""
    if not isinstance(doc, dict) or doc.get("type") != STATEMENT:
        return ["not a wmtrace statement"]
    n = doc.get("number")
    if not public.verify_document(doc):
        return [f"statement {n}: its signature is not the seller's"]
    problems = []
    head = doc.get("chain_head") or {}
    pinned = next((e for e in entries if e.get("seq") == head.get("seq")), None)
    if pinned is None:
        problems.append(f"statement {n}: the entry it pinned ({head.get('seq')}) is gone: the log was cut")
    elif pinned.get("hash") != head.get("hash"):
        problems.append(f"statement {n}: entry {head.get('seq')} is not the one it pinned: the log was rewritten")
    if not any(e.get("action") == "statement" and (e.get("detail") or {}).get("sha256") == document_hash(doc)
               for e in entries if isinstance(e.get("detail"), dict)):
        problems.append(f"statement {n}: not in the log: the log was cut after it, or it is not from this log")
    return problems
