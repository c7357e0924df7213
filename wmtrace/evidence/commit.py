"""Hash commitments: `commit(value, nonce)` binds the seller to a value (a master's key, a buyer's codeword)
without showing it; revealing value and nonce later opens it.

SHA-256 over a domain label, the 32-byte nonce and the value: binding as long as SHA-256 resists
collisions, hiding because the nonce is random (a master key) or a keyed derivation (a codeword, whose
Reed-Solomon part anyone could compute from the buyer's ID: without the nonce its 64-bit tag could be
searched for).
"""

from __future__ import annotations

import hashlib
import hmac
import os

NONCE_BYTES = 32


def nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def commit(label: str, value: bytes, nonce: bytes) -> str:
    return hashlib.sha256(b"wmtrace-commit\0" + label.encode() + b"\0" + nonce + value).hexdigest()


def opens(commitment: str, label: str, value: bytes, nonce: bytes) -> bool:
    return hmac.compare_digest(commitment, commit(label, value, nonce))


def key_commitment(key: bytes, nonce: bytes) -> str:
    """A master's secret key, committed when it is registered."""
    return commit("master-key", key, nonce)


def codeword_commitment(codeword_hex: str, nonce: bytes) -> str:
    """A buyer's codeword (packed bits as hex, as the registry stores it), committed in the Merkle tree."""
    return commit("codeword", bytes.fromhex(codeword_hex), nonce)
