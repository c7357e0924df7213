"""The seller's identity: one Ed25519 key pair per registry, and signed canonical-JSON documents.

Ed25519 (RFC 8032) through `cryptography`: deterministic signatures (no nonce to get wrong), 32-byte keys
that fit the registry's 0600 key files, about 30 us per signature on one core (BENCHMARKS.md *Evidence*),
so signing every audit entry costs nothing an issuing run would notice.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import BadInput

SIGNATURE = "signature"  # the field of a signed document that holds its signature


def canonical(obj) -> bytes:
    """The bytes a signature or hash covers: JSON with sorted keys and no whitespace (floats as Python
    writes them: the shortest string that reads back the same double)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def document_hash(doc: dict) -> str:
    """The hash of a document without its signature: what a later entry or statement refers to."""
    return sha256_hex(canonical({k: v for k, v in doc.items() if k != SIGNATURE}))


@dataclass(frozen=True)
class PublicKey:
    raw: bytes  # 32 bytes

    @property
    def fingerprint(self) -> str:
        """What documents name their signer by: sha256 of the raw key, 16 hex digits."""
        return sha256_hex(b"wmtrace-seller\0" + self.raw)[:16]

    def pem(self) -> str:
        key = Ed25519PublicKey.from_public_bytes(self.raw)
        return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    @classmethod
    def from_pem(cls, text: str | bytes, where: str = "public key") -> PublicKey:
        """A PEM public key (`wmtrace keys export-public`), or the raw key as 64 hex digits."""
        data = text.encode() if isinstance(text, str) else text
        try:
            if b"BEGIN" not in data:
                raw = bytes.fromhex(data.decode().strip())
                Ed25519PublicKey.from_public_bytes(raw)
                return cls(raw)
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnicodeDecodeError, TypeError) as e:
            raise BadInput(f"{where}: not an Ed25519 public key ({e})") from e
        if not isinstance(key, Ed25519PublicKey):
            raise BadInput(f"{where}: not an Ed25519 public key ({type(key).__name__})")
        return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    def verify(self, signature_hex: str, data: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(bytes.fromhex(signature_hex), data)
            return True
        except (InvalidSignature, ValueError, TypeError):
            return False

    def verify_document(self, doc: dict) -> bool:
        """The document's signature is this key's, over the document as it stands."""
        sig = doc.get(SIGNATURE) if isinstance(doc, dict) else None
        if not isinstance(sig, dict) or sig.get("signer") != self.fingerprint:
            return False
        return self.verify(str(sig.get("ed25519", "")), canonical({k: v for k, v in doc.items() if k != SIGNATURE}))


class SigningKey:
    """A private Ed25519 key: the seller's (one per registry) or a buyer's (`wmtrace receipt sign`). Its
    32-byte seed lives in a 0600 key file or sealed in a database; it is never printed."""

    def __init__(self, seed: bytes):
        if len(seed) != 32:
            raise BadInput("an Ed25519 key is 32 bytes")
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self._seed = seed
        self.public = PublicKey(self._key.public_key().public_bytes(serialization.Encoding.Raw,
                                                                    serialization.PublicFormat.Raw))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(os.urandom(32))

    @property
    def seed(self) -> bytes:
        """For storing the key (0600 file or sealed), never for display."""
        return self._seed

    def __repr__(self) -> str:  # never the seed
        return f"SigningKey({self.public.fingerprint})"

    def sign(self, data: bytes) -> str:
        return self._key.sign(data).hex()

    def sign_document(self, doc: dict) -> dict:
        """`doc` with a `signature` field: the signer's fingerprint and Ed25519 over the rest, canonical."""
        body = {k: v for k, v in doc.items() if k != SIGNATURE}
        return body | {SIGNATURE: {"signer": self.public.fingerprint, "ed25519": self.sign(canonical(body))}}

    def derive(self, label: str, message: str) -> bytes:
        """A secret derived from this key (HMAC-SHA256 keyed by a label-specific subkey): the nonces of
        codeword commitments, so nothing per buyer needs storing and revealing one reveals no other."""
        sub = hmac.new(self._seed, b"wmtrace-derive\0" + label.encode(), hashlib.sha256).digest()
        return hmac.new(sub, message.encode(), hashlib.sha256).digest()
