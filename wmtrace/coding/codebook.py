"""Every buyer's codeword of one master, computed once and kept: in this process, and in a file.

Scoring a leak against every issued buyer needs all their codewords; computing them is one HMAC tag
per buyer (0.45-0.72 s for 100,000 buyers, BENCHMARKS.md *Trace at registry scale*), more than
the scoring itself (18 ms). A codeword is a pure function of (key, master, buyer ID, code), so a table
of IDs 0..n-1 never goes stale: it is only extended when a larger ID is asked for.

The file is authenticated with a key derived from the master's key: a table edited on disk (a row
swapped to frame another buyer) fails its HMAC and is recomputed, never used. It is an optimisation
only: an unreadable, foreign or unwritable file costs the recomputation, never a verdict.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import codes, keys

MAGIC = b"WMTCODEBOOK1"
_HEAD = struct.Struct(">QH")  # rows, symbols
# A table is at most this many rows beyond the IDs asked for; a much larger ID (not from `issue`, whose
# IDs are contiguous) is computed on its own rather than growing the table to it.
SLACK = 1 << 20
_memo: dict[bytes, np.ndarray] = {}


def codewords(key: bytes, master: str, ids: Sequence[int] | np.ndarray, spec: codes.CodeSpec,
              path: str | os.PathLike | None = None) -> np.ndarray:
    """`codes.codewords(key, master, ids, spec)`, from the table of this master (extended and stored
    at `path` when it lacks an ID; `path=None` keeps it in this process only)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        return codes.codewords(key, master, ids, spec)
    top = int(ids.max()) + 1
    if top > ids.size + SLACK:
        return codes.codewords(key, master, ids, spec)
    ident = _identity(key, master, spec)
    table = _memo.get(ident)
    if table is None or len(table) < top:
        stored = _read(path, key, ident, spec) if path is not None else None
        if stored is not None and (table is None or len(stored) > len(table)):
            table = stored
        table = _memo[ident] = _extend(table, key, master, spec, top, path, ident)
    return table[ids]


def _identity(key: bytes, master: str, spec: codes.CodeSpec) -> bytes:
    """What the table belongs to; bound into its HMAC, so another master's or key's file is refused."""
    return hashlib.sha256(b"\x00".join([keys.derive(key, "codebook/id"), master.encode(),
                                        f"{spec.name}:{spec.symbols}".encode()])).digest()


def _mac(key: bytes, ident: bytes, head: bytes, body: bytes) -> bytes:
    return hmac.new(keys.derive(key, "codebook"), ident + head + body, hashlib.sha256).digest()


def _read(path: str | os.PathLike, key: bytes, ident: bytes, spec: codes.CodeSpec) -> np.ndarray | None:
    """The stored table, or None when missing, truncated, foreign or edited."""
    try:
        blob = Path(path).read_bytes()
    except OSError:
        return None
    start = len(MAGIC) + 32 + _HEAD.size
    if len(blob) < start or not blob.startswith(MAGIC):
        return None
    tag, head, body = blob[len(MAGIC):len(MAGIC) + 32], blob[len(MAGIC) + 32:start], blob[start:]
    rows, symbols = _HEAD.unpack(head)
    if symbols != spec.symbols or len(body) != rows * symbols:
        return None
    if not hmac.compare_digest(tag, _mac(key, ident, head, body)):
        return None
    return np.frombuffer(body, dtype=np.uint8).reshape(rows, symbols)


def _extend(table: np.ndarray | None, key: bytes, master: str, spec: codes.CodeSpec, top: int,
            path: str | os.PathLike | None, ident: bytes) -> np.ndarray:
    """The table grown to `top` rows at least (doubling, so a registry growing by one buyer at a time
    recomputes O(log n) times, not n), written back when it grew."""
    have = 0 if table is None else len(table)
    if have >= top:
        return table
    rows = max(top, 2 * have)
    new = codes.codewords(key, master, np.arange(have, rows), spec)
    table = new if table is None else np.concatenate([table, new])
    if path is not None:
        _write(Path(path), key, ident, table)
    return table


def _write(path: Path, key: bytes, ident: bytes, table: np.ndarray) -> None:
    """Atomically (temporary file, rename), 0600; failures are ignored (the table is only a cache)."""
    head = _HEAD.pack(*table.shape)
    body = np.ascontiguousarray(table).tobytes()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + _mac(key, ident, head, body) + head + body)
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
