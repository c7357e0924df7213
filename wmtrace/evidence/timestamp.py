"""RFC 3161 timestamp requests: a statement's hash in a `TimeStampReq`, to send to any timestamping
authority (`curl -H 'Content-Type: application/timestamp-query' --data-binary @s.tsq URL > s.tsr`) and
check with `openssl ts -verify`. wmtrace writes the request only: which authority to trust, and whether
to send anything at all, is the seller's choice.

The request is a few fixed DER fields around the SHA-256 digest (RFC 3161 section 2.4.1), encoded here
rather than pulling in an ASN.1 library; `openssl ts -query -in s.tsq -text` reads it (tests do).
"""

from __future__ import annotations

import hashlib
import os

SHA256_OID = bytes.fromhex("0609608648016503040201")  # 2.16.840.1.101.3.4.2.1, tag and length included


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        b = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(b)]) + b
    return bytes([tag]) + length + body


def _integer(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")  # a leading zero keeps it positive
    return _tlv(0x02, body)


def request(data: bytes, nonce: int | None = None) -> bytes:
    """TimeStampReq { version 1, messageImprint { sha256, digest(data) }, nonce, certReq TRUE }."""
    nonce = int.from_bytes(os.urandom(8), "big") if nonce is None else nonce
    algorithm = _tlv(0x30, SHA256_OID + b"\x05\x00")
    imprint = _tlv(0x30, algorithm + _tlv(0x04, hashlib.sha256(data).digest()))
    return _tlv(0x30, _integer(1) + imprint + _integer(nonce) + b"\x01\x01\xff")
