"""Sealing to an arbiter: what an evidence bundle reveals (the master's key, its nonces) encrypted so that
only the arbiter named at `wmtrace evidence --seal-to` can open it.

ECIES over X25519 (`cryptography`): an ephemeral key agreed with the arbiter's public key, HKDF-SHA256 to
an AES-256-GCM key, the ephemeral public key as associated data. The bundle can then travel (to a court,
to the accused) with every signature, proof and date checkable by anyone, while the key that could strip
the master's marks is readable by the arbiter alone.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import BadInput

MAGIC = b"wmtrace-sealed-1\n"
INFO = b"wmtrace reveal sealed to an arbiter"


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _aead(shared: bytes, ephemeral: bytes, recipient: bytes) -> AESGCM:
    key = HKDF(hashes.SHA256(), 32, salt=ephemeral + recipient, info=INFO).derive(shared)
    return AESGCM(key)


def new_key() -> tuple[bytes, bytes]:
    """An arbiter's key pair: (private 32 bytes, public 32 bytes)."""
    private = X25519PrivateKey.generate()
    return private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption()), _raw(private.public_key())


def public_of(private: bytes) -> bytes:
    return _raw(X25519PrivateKey.from_private_bytes(private).public_key())


def seal(recipient: bytes, plaintext: bytes) -> bytes:
    if len(recipient) != 32:
        raise BadInput("an arbiter's public key is 32 bytes (64 hex digits)")
    ephemeral = X25519PrivateKey.generate()
    eph = _raw(ephemeral.public_key())
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    nonce = os.urandom(12)
    return MAGIC + recipient + eph + nonce + _aead(shared, eph, recipient).encrypt(nonce, plaintext, MAGIC + eph)


def recipient_of(blob: bytes) -> bytes | None:
    """The arbiter public key a sealed blob is for (None: not a sealed blob)."""
    return blob[len(MAGIC):len(MAGIC) + 32] if blob.startswith(MAGIC) and len(blob) > len(MAGIC) + 76 else None


def unseal(private: bytes, blob: bytes) -> bytes:
    """The plaintext; BadInput when the blob is not for this key or was altered."""
    recipient = recipient_of(blob)
    if recipient is None:
        raise BadInput("not a sealed wmtrace reveal")
    me = X25519PrivateKey.from_private_bytes(private)
    if _raw(me.public_key()) != recipient:
        raise BadInput("sealed for another arbiter key")
    body = blob[len(MAGIC) + 32:]
    eph, nonce, ct = body[:32], body[32:44], body[44:]
    try:
        return _aead(me.exchange(X25519PublicKey.from_public_bytes(eph)), eph, recipient).decrypt(
            nonce, ct, MAGIC + eph)
    except InvalidTag as e:
        raise BadInput("the sealed reveal was altered (authentication failed)") from e
