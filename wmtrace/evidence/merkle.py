"""A Merkle tree over a statement's buyers, and the proof that one buyer is in it.

RFC 6962's shape (Certificate Transparency): leaves hashed with a 0x00 prefix and nodes with 0x01, so a
node can never pass for a leaf; an odd node at the end of a level is carried up unchanged, so a tree of n
leaves has exactly one root and every proof at most ceil(log2 n) steps. 100,000 leaves take about 0.3 s
(BENCHMARKS.md *Evidence*).
"""

from __future__ import annotations

import hashlib

from .signing import canonical


def leaf_hash(leaf: dict) -> bytes:
    return hashlib.sha256(b"\x00" + canonical(leaf)).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def levels(leaves: list[bytes]) -> list[list[bytes]]:
    """Every level of the tree, leaves first; the root is `levels[-1][0]` (an empty tree: sha256 of nothing)."""
    if not leaves:
        return [[hashlib.sha256(b"").digest()]]
    out = [list(leaves)]
    while len(out[-1]) > 1:
        level = out[-1]
        up = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            up.append(level[-1])
        out.append(up)
    return out


def root(leaves: list[bytes]) -> str:
    return levels(leaves)[-1][0].hex()


def proof(tree: list[list[bytes]], index: int) -> list[list[str]]:
    """The siblings from leaf `index` to the root, each as [side, hash hex] ("L": the sibling is on the left)."""
    steps = []
    for level in tree[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            steps.append(["L" if sibling < index else "R", level[sibling].hex()])
        index //= 2
    return steps


def verify(leaf: dict, steps: list, root_hex: str) -> bool:
    """The leaf is in the tree whose root is `root_hex`."""
    try:
        h = leaf_hash(leaf)
        for side, sibling in steps:
            s = bytes.fromhex(sibling)
            h = _node(s, h) if side == "L" else _node(h, s) if side == "R" else None
            if h is None:
                return False
        return h.hex() == root_hex
    except (TypeError, ValueError):
        return False
