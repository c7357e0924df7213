"""Master keys sealed for a shared database: AES-256-GCM under the operator's key-encryption key (KEK).

A database shared by many hosts is read by more people than a 0600 file; it never holds a key in the
clear. Each key is sealed with a random 96-bit nonce and the master's name as associated data (a sealed
key copied onto another master's row does not open); the seller's signing seed likewise, under its own
associated data. The KEK comes from `WMTRACE_KEK_FILE` (64 hex digits, mode 0600 or stricter) or
`WMTRACE_KEK` (hex); it is never written anywhere by wmtrace. Only its fingerprint is stored beside each
sealed key, so a wrong KEK is named as such.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import BadInput

KEK_BYTES, NONCE_BYTES = 32, 12
NO_KEK = ("no key-encryption key: set WMTRACE_KEK_FILE to a 0600 file holding 64 hex digits (or WMTRACE_KEK); "
          "a PostgreSQL registry keeps master keys only sealed under it")


def _parse(text: str, where: str) -> bytes:
    try:
        kek = bytes.fromhex(text.strip())
    except ValueError:
        kek = b""
    if len(kek) != KEK_BYTES:
        raise BadInput(f"{where}: a key-encryption key is {KEK_BYTES} bytes written as {2 * KEK_BYTES} hex digits")
    return kek


def load_kek() -> bytes:
    """The operator's KEK from the environment; BadInput when none is given or it is unfit."""
    path = os.environ.get("WMTRACE_KEK_FILE")
    if path:
        p = Path(path)
        try:
            mode = p.stat().st_mode
            text = p.read_text()
        except OSError as e:
            raise BadInput(f"{p}: cannot read the key-encryption key ({e.strerror})") from e
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise BadInput(f"{p}: key-encryption key file is accessible by other users; run chmod 600 on it")
        return _parse(text, str(p))
    if os.environ.get("WMTRACE_KEK"):
        return _parse(os.environ["WMTRACE_KEK"], "WMTRACE_KEK")
    raise BadInput(NO_KEK)


def kek_fingerprint(kek: bytes) -> str:
    return hashlib.sha256(b"wmtrace-kek" + kek).hexdigest()[:16]


def _ad(master: str) -> bytes:
    return b"wmtrace master key\0" + master.encode()


# The seller's signing seed is sealed the same way, under associated data no master's can equal (a master's
# sealed key copied onto the seller's row, or back, does not open).
SELLER_AD = b"wmtrace seller key\0"
SELLER = "the seller's signing key"


def seal(kek: bytes, master: str, key: bytes) -> tuple[bytes, bytes]:
    """(nonce, ciphertext with its tag) of `key` for `master`."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce, AESGCM(kek).encrypt(nonce, key, _ad(master))


def unseal(kek: bytes, master: str, nonce: bytes, sealed: bytes, sealed_by: str) -> bytes:
    """The key of `master`; a KEK that is not the one it was sealed with is refused by name."""
    return _open(kek, _ad(master), nonce, sealed, sealed_by, f"key of master {master!r}", "another master's row")


def seal_seller(kek: bytes, seed: bytes) -> tuple[bytes, bytes]:
    """(nonce, ciphertext with its tag) of the seller's 32-byte Ed25519 seed."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce, AESGCM(kek).encrypt(nonce, seed, SELLER_AD)


def unseal_seller(kek: bytes, nonce: bytes, sealed: bytes, sealed_by: str) -> bytes:
    return _open(kek, SELLER_AD, nonce, sealed, sealed_by, SELLER, "a master's key row")


def _open(kek: bytes, ad: bytes, nonce: bytes, sealed: bytes, sealed_by: str, what: str, elsewhere: str) -> bytes:
    fp = kek_fingerprint(kek)
    if fp != sealed_by:
        raise BadInput(f"{what}: key-encryption key fingerprint check failed (given {fp}, "
                       f"sealed under {sealed_by}); set WMTRACE_KEK_FILE to the KEK this registry was created with")
    try:
        return AESGCM(kek).decrypt(nonce, sealed, ad)
    except InvalidTag:
        raise BadInput(f"{what}: sealed key fails authentication (altered, or copied from "
                       f"{elsewhere}); restore it from a backup") from None
