"""`registry migrate`: copy a registry into another backend (SQLite folder <-> PostgreSQL), verified.

Masters with their files and keys (re-sealed under the destination's KEK, or written to 0600 files),
buyers of every status and the audit log are copied under both registries' locks, into a destination
that holds nothing yet; then every count, every master's weights sha256 and key fingerprint, and every
buyer's sha256 and codeword are read back from the destination and compared with the source.
Reservations arrive without an owner: the next `issue` on the destination takes them over.

The evidence moves with it: the seller's signing key (the destination signs with the source's, so
statements, receipts and bundles made before still name this seller), the audit chain row for row
(seq, links, signatures: it verifies on the destination as it did on the source), masters' key
commitments, statements, and buyers' statements and acknowledgements. The "migrate" entry is then
appended through the chain. A registry from before the chain is copied as it is; the destination's
first write (that entry) starts the chain there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..coding import keys
from ..errors import BadInput
from .base import RegistryBackend
from .records import Master
from .storage import sha256_file


def _copy(src: Path, dest: Path) -> int:
    """Copy a file atomically (0600); its size, 0 when `src` does not exist."""
    if not src.exists():
        return 0
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest.stat().st_size


def _copy_master(src: RegistryBackend, dst: RegistryBackend, m: Master) -> tuple[int, int]:
    """(files, bytes) copied for master `m`: its files, its key, then its row."""
    dest = dst.weights_path(m.name)
    pairs = [(m.weights, dest), (src.moments_path(m.weights), dst.moments_path(dest)),
             (src.template_path(m.weights), dst.template_path(dest))]
    sizes = [_copy(a, b) for a, b in pairs]
    if sha256_file(dest) != m.weights_sha256:
        raise BadInput(f"{m.weights}: master {m.name!r} weights differ from the registered sha256; not migrated")
    key = src.key(m.name)
    if dst.has_key(m.name):
        raise BadInput(f"{dst.location} already holds a key for master {m.name!r}; migrate into an empty registry")
    dst.store_key(m.name, key)
    dst.add_master(Master(m.name, dest, m.weights_sha256, m.factory, m.data, m.config, m.key_fingerprint, m.accuracy),
                   log=False)  # the source's commitment is copied with the records, not made anew
    return sum(1 for a, _ in pairs if a.exists()), sum(sizes)


def migrate(src: RegistryBackend, dst: RegistryBackend) -> dict:
    """Copy `src` into the empty registry `dst` and verify the copy; returns what was copied."""
    if src.location == dst.location:
        raise BadInput(f"{dst.location}: source and destination are the same registry")
    if dst.masters() or dst.buyers(status=None) or dst.audit_log(1):
        raise BadInput(f"{dst.location} already holds a registry; migrate copies into an empty one only")
    files = size = 0
    with src.lock(), dst.lock():
        masters = src.masters()
        if not masters:
            raise BadInput(f"registry {src.location} has no master: nothing to migrate")
        if src.has_seller_key():  # before anything is signed on the destination
            dst.adopt_seller(src.seller_key().seed)
        for m in masters:
            n, b = _copy_master(src, dst, m)
            files, size = files + n, size + b
        audit = src.audit_chain()
        dst.import_records(src.buyers(status=None), audit, src.evidence_records())
        dst.log_event("migrate", None, **{"from": src.location, "masters": len(masters)})
    return {"from": src.location, "to": dst.location, **verify(src, dst), "audit": len(audit) + 1, "files": files,
            "bytes": size}


def verify(src: RegistryBackend, dst: RegistryBackend) -> dict:
    """Compare `dst` with `src` as read back from `dst`: BadInput naming the first difference."""
    found = []
    for m in src.masters():
        got = dst.master(m.name)
        if sha256_file(got.weights) != m.weights_sha256 or got.weights_sha256 != m.weights_sha256:
            raise BadInput(f"{dst.location}: master {m.name!r} weights differ from the source's")
        fp = keys.fingerprint(dst.key(m.name))
        if fp != m.key_fingerprint or got.key_fingerprint != m.key_fingerprint:
            raise BadInput(f"{dst.location}: master {m.name!r} key fingerprint differs from the source's")
        found.append({"name": m.name, "key_fingerprint": fp, "weights_sha256": m.weights_sha256,
                      "buyers": len(dst.buyers(m.name))})
    if len(dst.masters()) != len(found):
        raise BadInput(f"{dst.location}: holds {len(dst.masters())} masters, the source {len(found)}")
    fields = ("master", "id", "name", "status", "file", "sha256", "codeword")
    want = [tuple(getattr(b, f) for f in fields) for b in src.buyers(status=None)]
    have = [tuple(getattr(b, f) for f in fields) for b in dst.buyers(status=None)]
    if want != have:
        diff = next((w for w, h in zip(want, have, strict=False) if w != h), f"{len(want)} rows vs {len(have)}")
        raise BadInput(f"{dst.location}: buyers differ from the source's (first: {diff})")
    return {"masters": found, "buyers": len(dst.buyers(status="issued")),
            "reserved": len(dst.buyers(status="reserved")), **_verify_evidence(src, dst)}


def _verify_evidence(src: RegistryBackend, dst: RegistryBackend) -> dict:
    """The destination signs with the source's key, holds the source's audit rows as they are (so its chain
    head is among them), and its commitments, statements and buyers' marks (BadInput naming what differs).
    Entries the destination appended since (the "migrate" one, a chain started there) may follow."""
    seller = None
    if src.has_seller_key():
        seller = src.public_key().fingerprint
        if dst.public_key().fingerprint != seller:
            raise BadInput(f"{dst.location}: signs with another seller key than the source's")
    chain = src.audit_chain()
    if chain and dst.audit_chain(last=chain[-1]["seq"]) != chain:
        raise BadInput(f"{dst.location}: audit log differs from the source's")
    have, want = dst.evidence_records(), src.evidence_records()
    for name, row in want["masters"].items():
        if row["key_commitment"] is not None and have["masters"].get(name) != row:
            raise BadInput(f"{dst.location}: master {name!r} key commitment differs from the source's")
    if have["statements"][:len(want["statements"])] != want["statements"]:
        raise BadInput(f"{dst.location}: statements differ from the source's")
    if any(have["marks"].get(k) != v for k, v in want["marks"].items()):
        raise BadInput(f"{dst.location}: buyers' statements or acknowledgements differ from the source's")
    head = next((e["hash"] for e in reversed(chain) if e["hash"]), None)
    return {"seller": seller, "chain_head": head, "statements": len(want["statements"])}
