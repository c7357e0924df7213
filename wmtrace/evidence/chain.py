"""The audit log as a hash chain: each entry commits to the one before it and is signed by the seller.

An entry's hash covers its time, action, master, detail and the previous entry's hash; its signature
covers the hash. So an edited entry no longer matches its hash, a removed one leaves its successor
pointing at a hash that is not there, and moved ones point at the wrong neighbour: `check` says which.
The sequence number is not hashed: it is where the entry is stored, and renumbering is harmless.
What a chain alone cannot show is a cut at its end; statements carry the head (`statement.build`),
so a published statement pins everything before it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .signing import PublicKey, SigningKey, canonical, sha256_hex

GENESIS = "0" * 64  # the previous hash of a chain's first entry
START = "chain-start"  # the first signed entry: the seller's key, and what the registry held before


def entry_hash(prev: str, at: float, action: str, master: str | None, detail: dict) -> str:
    return sha256_hex(canonical({"prev": prev, "at": at, "action": action, "master": master, "detail": detail}))


def seal(key: SigningKey, prev: str, at: float, action: str, master: str | None, detail: dict) -> tuple[str, str]:
    """The new entry's hash and signature."""
    h = entry_hash(prev, at, action, master, detail)
    return h, key.sign(bytes.fromhex(h))


@dataclass(frozen=True)
class Problem:
    seq: int
    what: str

    def __str__(self) -> str:
        return f"entry {self.seq}: {self.what}"


def check(entries: list[dict], public: PublicKey, first_prev: str | None = None) -> list[Problem]:
    """Every break in `entries` (in stored order, each with seq, at, action, master, detail, prev, hash,
    sig): edited, unsigned or wrongly signed, removed, reordered. `first_prev`: the hash the first entry
    must follow (GENESIS for a whole chain; None for a segment, whose start is taken as it is)."""
    problems: list[Problem] = []
    entries = [e if isinstance(e, dict) else {} for e in entries]  # another shape: malformed, below
    by_hash = {e.get("hash"): e for e in entries if isinstance(e.get("hash"), str)}
    prev_hash, prev_seq = first_prev, None
    for e in entries:
        seq = e.get("seq")
        try:
            h = entry_hash(e["prev"], e["at"], e["action"], e["master"], e["detail"])
            if not isinstance(e["prev"], str | None):
                raise TypeError("prev")
        except (KeyError, TypeError, ValueError):
            problems.append(Problem(seq, "malformed (fields missing or unreadable)"))
            prev_hash, prev_seq = e.get("hash"), seq
            continue
        if h != e.get("hash"):
            problems.append(Problem(seq, f"edited: its content no longer matches its hash ({e['action']})"))
        elif not public.verify(str(e.get("sig") or ""), bytes.fromhex(h)):
            problems.append(Problem(seq, "signature is not the seller's"))
        if prev_hash is not None and e["prev"] != prev_hash:
            problems.append(Problem(seq, _broken_link(e, prev_seq, by_hash)))
        prev_hash, prev_seq = e.get("hash"), seq
    return problems


def _broken_link(e: dict, prev_seq: int | None, by_hash: dict) -> str:
    """Why an entry does not follow the one stored before it."""
    before = by_hash.get(e["prev"])
    if before is not None:
        return f"out of order: it follows entry {before.get('seq')}, not entry {prev_seq}"
    if isinstance(prev_seq, int) and isinstance(e.get("seq"), int) and e["seq"] > prev_seq + 1:
        gap = e["seq"] - prev_seq - 1
        return f"{gap} entr{'y' if gap == 1 else 'ies'} before it removed (after entry {prev_seq})"
    return f"the entry it follows is missing (after entry {prev_seq})"
