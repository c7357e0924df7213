"""Master secrets and what is derived from them: projection matrices and tag keys.

One 32-byte secret per master. Everything else is derived with HMAC-SHA256 and SHAKE-256, so
a key reproduces the same projections on any machine and any library version (no dependence on
a framework's random number generator).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

import numpy as np

from ..errors import BadInput

KEY_BYTES = 32


def generate() -> bytes:
    return os.urandom(KEY_BYTES)


def write(path: str | os.PathLike, key: bytes) -> None:
    """Create the key file, mode 0600 from the start (never a moment when others can read it), and
    atomically: it is written and synced under a temporary name, then linked into place, so the key
    file either does not exist or holds the whole key, whenever the process dies. Never replaces an
    existing file."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        raise BadInput(f"{path}: cannot create key file ({e.strerror})") from e
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, key.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    except FileExistsError as e:
        raise BadInput(f"{path}: key file already exists; refusing to overwrite it") from e
    except OSError as e:
        raise BadInput(f"{path}: cannot write key file ({e.strerror})") from e
    finally:
        tmp.unlink(missing_ok=True)
    try:  # the link's directory entry survives a power cut too
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def read(path: str | os.PathLike) -> bytes:
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as e:
        raise BadInput(f"{path}: cannot read key file ({e.strerror})") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BadInput(f"{path}: key file is accessible by other users; run chmod 600 on it")
    try:
        key = bytes.fromhex(text)
    except ValueError as e:
        raise BadInput(f"{path}: key file is corrupt") from e
    if len(key) != KEY_BYTES:
        raise BadInput(f"{path}: key file is corrupt")
    return key


def derive(key: bytes, label: str) -> bytes:
    return hmac.new(key, label.encode(), hashlib.sha256).digest()


def fingerprint(key: bytes) -> str:
    """A public identifier of a key, safe to print: reveals nothing about the secret."""
    return derive(key, "fingerprint").hex()[:16]


def projection(key: bytes, label: str, rows: int, cols: int) -> np.ndarray:
    """Standard normal matrix (float64) from the key: Box-Muller over SHAKE-256 output."""
    n = rows * cols
    stream = hashlib.shake_256(derive(key, f"projection/{label}")).digest(8 * (n + n % 2))
    u = np.frombuffer(stream, dtype="<u8").astype(np.float64)
    u = (u + 0.5) / 2.0**64  # uniform in (0, 1), never exactly 0
    u1, u2 = u[0::2], u[1::2]
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
    return z[:n].reshape(rows, cols)


def signs(key: bytes, label: str, rows: int, cols: int) -> np.ndarray:
    """Matrix of +-1 (float64) from the key, one SHAKE-256 output bit each."""
    n = rows * cols
    stream = hashlib.shake_256(derive(key, f"signs/{label}")).digest((n + 7) // 8)
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8))[:n]
    return (2.0 * bits - 1.0).reshape(rows, cols)
