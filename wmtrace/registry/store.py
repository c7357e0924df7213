"""The registry's folder: the one module that knows where each file lives and how it is created.

    ROOT/                    0700
      wmtrace.db             0600  SQLite: masters, buyers, audit (schema in `sqlite`)
      registry.lock          0600  held (flock) while a master is registered or the example set up
      keys/MASTER.key        0600  the master's secret: lose it and no issued copy can be traced
      seller.key             0600  the registry's Ed25519 signing key: audit log, statements, evidence
      masters/MASTER.safetensors, MASTER.moments.safetensors   the registered weights and metric
      cache/                       the bundled example master, trained once

The rules that keep a key from ever being lost live here: a database is only ever created next to
no keys and no masters (a missing or emptied database beside existing keys means a damaged
registry, to be restored, never silently restarted), and it is published atomically, so a
concurrent process sees either no database or a complete one.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from ..coding import keys
from ..errors import BadInput
from .records import Master

DB_NAME = "wmtrace.db"
LOCK_NAME = "registry.lock"
KEYS, MASTERS, CACHE = "keys", "masters", "cache"
SELLER_KEY = "seller.key"  # the registry's Ed25519 signing key (`ledger`): its audit log and statements


def default_path() -> Path:
    return Path(os.environ.get("WMTRACE_REGISTRY") or Path.cwd() / "registry")


class Layout:
    """Paths inside one registry folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.db = self.root / DB_NAME
        self.lock_file = self.root / LOCK_NAME
        self.keys = self.root / KEYS
        self.masters = self.root / MASTERS
        self.cache = self.root / CACHE
        self.seller = self.root / SELLER_KEY

    def key(self, master: str) -> Path:
        return self.keys / f"{master}.key"

    def weights(self, master: str) -> Path:
        return self.masters / f"{master}.safetensors"

    def moments(self, weights: str | os.PathLike) -> Path:
        """The placement metric stored beside a master's registered weights."""
        weights = Path(weights)
        return weights.with_name(weights.name.removesuffix(".safetensors") + ".moments.safetensors")

    def template(self, weights: str | os.PathLike) -> Path:
        """A GGUF master's metadata (tokenizer, architecture), stored beside its registered weights."""
        weights = Path(weights)
        return weights.with_name(weights.name.removesuffix(".safetensors") + ".template.gguf")

    def secrets_present(self) -> list[Path]:
        """Keys and registered masters already in the folder (what a fresh database would orphan)."""
        found: list[Path] = []
        for folder in (self.keys, self.masters):
            if folder.is_dir():
                found += sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        return found + ([self.seller] if self.seller.exists() else [])

    def refuse_orphans(self) -> None:
        """Refuse to start a database next to keys or registered masters: that registry lost its
        database, and a new empty one would hide every issued copy (the road to deleting its keys)."""
        found = self.secrets_present()
        if found:
            raise BadInput(
                f"{self.root} holds keys or masters ({found[0].name}) but no database {DB_NAME}: restore the "
                "registry from a backup rather than starting a new one over them"
            )

    def create(self, schema: str) -> None:
        """Make the folders (0700) and publish a database holding `schema` (0600), unless one exists
        (`refuse_orphans` first)."""
        try:
            for folder in (self.root, self.keys, self.masters):
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise BadInput(f"{self.root}: cannot create registry ({e.strerror})") from e
        if self.db.exists():
            return
        self.refuse_orphans()
        tmp = self.root / f".{DB_NAME}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.executescript(schema)
            finally:
                conn.close()
            try:
                os.link(tmp, self.db)  # never replaces: a database published meanwhile is kept
            except FileExistsError:
                pass
        except (OSError, sqlite3.Error) as e:
            reason = getattr(e, "strerror", None) or e
            raise BadInput(f"{self.db}: cannot create the registry database ({reason})") from e
        finally:
            tmp.unlink(missing_ok=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the registry-wide lock (flock: released by the kernel if the process dies)."""
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise BadInput(f"{self.lock_file}: cannot open the registry lock ({e.strerror})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


class Paths:
    """A registry's master files, wherever its records are: master weights and their stored tensors.
    A backend provides `layout` and `fingerprint`."""

    layout: Layout

    @property
    def location(self) -> str:
        """The registry as shown to the user (a database URL without its password, or the folder)."""
        return str(self.layout.root)

    def fingerprint(self, master: str) -> str | None:
        """The registered key fingerprint of `master` (None: not registered)."""
        raise NotImplementedError

    def weights_path(self, master: str) -> Path:
        return self.layout.weights(master)

    def moments_path(self, weights: str | os.PathLike) -> Path:
        return self.layout.moments(weights)

    def template_path(self, weights: str | os.PathLike) -> Path:
        return self.layout.template(weights)

    def cache_path(self, name: str) -> Path:
        return self.layout.cache / name

    def stored(self, m: Master) -> dict[str, np.ndarray]:
        """The tensors a master's schemes stored at registration (the white-box placement metric per
        carrier name), as float64; empty when none were."""
        path = self.layout.moments(m.weights)
        if not path.exists():
            return {}
        try:
            return {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}
        except Exception as e:
            raise BadInput(f"{path}: stored placement metric of master {m.name!r} is unreadable ({e})") from e

    def _check_fingerprint(self, master: str, key: bytes, where: str) -> bytes:
        """A key swapped or regenerated is refused rather than used to accuse anyone."""
        recorded = self.fingerprint(master)
        if recorded is not None and recorded != keys.fingerprint(key):
            raise BadInput(f"{where}: key does not belong to master {master!r} "
                           "(fingerprint differs from the registered one); restore the key from a backup")
        return key


class Files(Paths):
    """Keys in 0600 files of the registry folder (the SQLite backend)."""

    def key_path(self, master: str) -> Path:
        return self.layout.key(master)

    def has_key(self, master: str) -> bool:
        return self.key_path(master).exists()

    def store_key(self, master: str, key: bytes) -> None:
        """Write the master's key file (0600); never overwrites one."""
        keys.write(self.key_path(master), key)

    def key(self, master: str) -> bytes:
        """The master's secret, checked against the fingerprint recorded at registration."""
        return self._check_fingerprint(master, keys.read(self.key_path(master)), f"{self.key_path(master)}")
