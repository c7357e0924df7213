"""Evidence a third party can check, seller side: statements and receipts after `issue`, and the
bundle `wmtrace evidence LEAK` writes (verified by `pipeline.verify` with no registry).

A bundle holds what an arbiter needs and nothing more: the leak's hash, the trace result, the signed
statements and Merkle proofs of the accused buyers (their receipts and acknowledgements), the audit
chain from the master's key commitment to this trace, and what re-running the extraction needs: that
master's key and its carrier tensors only (never another master's, never the full weights).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import BadInput
from ..evidence import timestamp
from ..evidence.signing import canonical
from ..registry import Buyer, Registry

BUNDLE = "bundle.json"
FORMAT = "wmtrace/evidence"


def write_document(path: Path, doc: dict) -> None:
    """A signed document as its canonical bytes (what its signature and any timestamp cover), atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(canonical(doc) + b"\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def publish(reg: Registry, master: str, issued: Sequence[Buyer], out: Path) -> dict | None:
    """After `issue`: a signed statement over the master's buyers not yet in one (these, and any an
    interrupted run left), its RFC 3161 request, and each buyer's receipt beside their copy."""
    if not issued:
        return None
    doc = reg.make_statement(master)
    if doc is not None:
        name = f"statement-{doc['number']}"
        write_document(out / f"{name}.json", doc)
        (out / f"{name}.tsq").write_bytes(timestamp.request(canonical(doc) + b"\n"))
    for b in issued:
        r = reg.receipts(master, [b.id]).get(b.id)
        if r is not None:
            path = out / f"{b.name}.receipt.json"
            write_document(path, r)
            b.extra["receipt"] = str(path)
    return doc


def leak_sha256(path: str | os.PathLike) -> tuple[str, int]:
    """(sha256, bytes) of a leaked file; of a folder, sha256 over each file's relative path and sha256."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise BadInput(f"{path}: no file to hash")
    digests, size = [], 0
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        size += f.stat().st_size
        digests.append((f.relative_to(path).as_posix() if f != path else "", h.hexdigest()))
    if path.is_file():
        return digests[0][1], size
    return hashlib.sha256(canonical(digests)).hexdigest(), size
