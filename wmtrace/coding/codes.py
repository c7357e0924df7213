"""Buyer payloads, their Reed-Solomon codewords, and soft-decision decoding with a false-accusation bound.

A payload is a buyer ID plus a keyed tag: the tag makes a random word that happens to decode
still fail verification, and the keyed tag means nobody without the master key can forge a
valid payload for another buyer. The codeword is over GF(256), one symbol per 8 embedded bits,
so a carrier layer that is lost whole costs erasures, which are twice as cheap as errors.
"""

from __future__ import annotations

import functools
import hmac
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from hashlib import sha256

import numpy as np
import reedsolo

ID_BYTES = 4
TAG_BYTES = 4


@dataclass(frozen=True)
class CodeSpec:
    """Shape of the embedded code: `symbols` bytes in all, `ID_BYTES + TAG_BYTES` of them data."""

    symbols: int = 32
    name: str = "rs"

    @property
    def data_symbols(self) -> int:
        return ID_BYTES + TAG_BYTES

    @property
    def parity(self) -> int:
        return self.symbols - self.data_symbols

    @property
    def bits(self) -> int:
        return 8 * self.symbols

    def validate(self) -> None:
        if self.name != "rs":
            raise ValueError(f"unknown code {self.name!r} (supported: rs)")
        if not self.data_symbols < self.symbols <= 255:
            raise ValueError(f"code length must be between {self.data_symbols + 1} and 255 symbols")


def _codec(spec: CodeSpec) -> reedsolo.RSCodec:
    return reedsolo.RSCodec(spec.parity, nsize=255)


def tag(tag_key: bytes, master: str, buyer_id: int) -> bytes:
    msg = f"{master}\x00{buyer_id}".encode()
    return hmac.new(tag_key, msg, sha256).digest()[:TAG_BYTES]


def payload(tag_key: bytes, master: str, buyer_id: int) -> bytes:
    if not 0 <= buyer_id < 2 ** (8 * ID_BYTES):
        raise ValueError(f"buyer id {buyer_id} does not fit in {ID_BYTES} bytes")
    return buyer_id.to_bytes(ID_BYTES, "big") + tag(tag_key, master, buyer_id)


def encode(data: bytes, spec: CodeSpec) -> np.ndarray:
    """Codeword bits (uint8 0/1, MSB first per symbol) for a payload."""
    word = bytes(_codec(spec).encode(bytearray(data)))
    return np.unpackbits(np.frombuffer(word, dtype=np.uint8))


def codeword(tag_key: bytes, master: str, buyer_id: int, spec: CodeSpec) -> np.ndarray:
    return encode(payload(tag_key, master, buyer_id), spec)


@functools.lru_cache(maxsize=8)
def _parity_table(symbols: int) -> np.ndarray:
    """T[i, v]: parity symbols of the payload with byte v at position i and zeros elsewhere.

    Reed-Solomon encoding is linear over GF(2) (addition in GF(256) is XOR), so a payload's parity
    is the XOR of its bytes' rows, and each row is the XOR of its set bits' rows: 8 x 8 encodings
    build the whole table.
    """
    spec = CodeSpec(symbols)
    codec, k = _codec(spec), spec.data_symbols
    unit = np.zeros((k, 8, spec.parity), dtype=np.uint8)
    for i in range(k):
        for b in range(8):
            data = bytearray(k)
            data[i] = 1 << b
            unit[i, b] = np.frombuffer(bytes(codec.encode(data))[k:], dtype=np.uint8)
    table = np.zeros((k, 256, spec.parity), dtype=np.uint8)
    for v in range(1, 256):
        low = (v & -v).bit_length() - 1
        table[:, v] = table[:, v & (v - 1)] ^ unit[:, low]
    return table


def codewords(tag_key: bytes, master: str, buyer_ids: Sequence[int] | np.ndarray, spec: CodeSpec) -> np.ndarray:
    """Codeword symbols (uint8, one row of `spec.symbols` bytes per buyer) for many buyers at once.

    The same words as `codeword`, packed: scoring a large registry needs them for every buyer, and
    one Reed-Solomon encoding per buyer in Python would dominate the time.
    """
    ids = np.asarray(buyer_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= 2 ** (8 * ID_BYTES)):
        raise ValueError(f"buyer ids must fit in {ID_BYTES} bytes")
    k = spec.data_symbols
    data = np.empty((ids.size, k), dtype=np.uint8)
    shifts = 8 * np.arange(ID_BYTES - 1, -1, -1)
    data[:, :ID_BYTES] = (ids[:, None] >> shifts) & 0xFF
    tags = b"".join(tag(tag_key, master, int(i)) for i in ids)
    data[:, ID_BYTES:] = np.frombuffer(tags, dtype=np.uint8).reshape(ids.size, TAG_BYTES)
    table = _parity_table(spec.symbols)
    parity = np.bitwise_xor.reduce(table[np.arange(k), data], axis=1) if ids.size else np.zeros((0, spec.parity))
    return np.concatenate([data, parity.astype(np.uint8)], axis=1)


def verify(tag_key: bytes, master: str, data: bytes) -> int | None:
    """The buyer ID carried by a decoded payload, or None if its tag is wrong."""
    buyer_id = int.from_bytes(data[:ID_BYTES], "big")
    ok = hmac.compare_digest(data[ID_BYTES:], tag(tag_key, master, buyer_id))
    return buyer_id if ok else None


@dataclass(frozen=True)
class Decoded:
    buyer_id: int
    bit_errors: int  # hard-bit disagreements with the decoded codeword, over non-missing bits
    symbol_errors: int  # symbols corrected as errors
    erasures: int  # symbols decoded as erasures
    false_positive_probability: float


def _ball(n: int, radius: int) -> int:
    """Words of length n over GF(256) within `radius` symbol errors of a fixed word."""
    return sum(math.comb(n, i) * 255**i for i in range(radius + 1))


def chance_of_match(spec: CodeSpec, erasures: int, errors: int, candidates: int) -> float:
    """Probability that uniform random symbols on the non-erased positions come within
    `errors` of one of `candidates` fixed codewords.

    Extracted bits of a model that does not carry our mark are i.i.d. fair coins: each is the
    sign of a Gaussian projection (our secret key) of a vector the key is independent of, and the
    erasure choice uses only magnitudes, which are independent of signs.
    """
    kept = spec.symbols - erasures
    num = candidates * _ball(kept, errors)
    return min(1.0, num / 256**kept)


def decode(
    soft: np.ndarray,
    spec: CodeSpec,
    check: Callable[[bytes], int | None],
    candidates: int,
    max_false_positive: float = 1e-6,
) -> Decoded | None:
    """Errors-and-erasures decoding of soft bits; NaN (or exactly 0) marks a bit with no evidence.

    Tries the hard decision first, then erases the least reliable symbols two at a time. Every
    attempt is one more chance for a random word to pass, so the reported probability is the
    union over all attempts of the chance that an unmarked model names a registered buyer there:
    a bound for the whole procedure, not for the one attempt that happened to succeed. `check`
    maps a decoded payload to a buyer ID, or None if the tag is wrong or the buyer unknown.
    """
    soft = np.asarray(soft, dtype=np.float64)
    if soft.shape != (spec.bits,):
        raise ValueError(f"expected {spec.bits} soft bits, got {soft.shape}")
    missing = np.isnan(soft) | (soft == 0)
    hard = np.packbits((np.nan_to_num(soft) > 0).astype(np.uint8))
    reliability = np.where(missing, -1.0, np.abs(np.nan_to_num(soft))).reshape(spec.symbols, 8).min(axis=1)
    forced = [int(i) for i in np.flatnonzero(reliability < 0)]
    order = [int(i) for i in np.argsort(reliability, kind="stable") if reliability[i] >= 0]
    attempts = [sorted(forced + order[:extra]) for extra in range(0, spec.parity - len(forced) + 1, 2)]
    bound = sum(
        chance_of_match(spec, len(e), (spec.parity - len(e)) // 2, candidates) for e in attempts
    )
    if not attempts or bound > max_false_positive:
        return None

    codec = _codec(spec)
    for erase in attempts:
        try:
            data, word, _ = codec.decode(bytearray(hard), erase_pos=erase or None)
        except reedsolo.ReedSolomonError:
            continue
        word = np.frombuffer(bytes(word), dtype=np.uint8)
        keep = np.ones(spec.symbols, dtype=bool)
        keep[erase] = False
        errors = int(np.count_nonzero(word[keep] != hard[keep]))
        if errors > (spec.parity - len(erase)) // 2:
            continue
        buyer = check(bytes(data))
        if buyer is None:
            continue
        bits = np.unpackbits(word)
        bit_errors = int(np.count_nonzero(bits[~missing] != (soft[~missing] > 0)))
        return Decoded(buyer, bit_errors, errors, len(erase), min(1.0, bound))
    return None
