"""The seller's registry: masters, their keys, buyers, issued files and an audit log.

An SQLite file plus two folders (`keys/`, mode 0700 with 0600 files, and `masters/`, copies of
the registered master weights). Buyer IDs are reserved inside an IMMEDIATE transaction, so two
issuing processes on one registry never hand out the same ID; a reservation whose process died
is taken over by the next `issue`, so an interrupted run resumes rather than leaving holes.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import keys
from .errors import BadInput

DB_NAME = "wmtrace.db"
SCHEMA = """
CREATE TABLE IF NOT EXISTS masters (
    name TEXT PRIMARY KEY,
    weights TEXT NOT NULL,
    weights_sha256 TEXT NOT NULL,
    factory TEXT NOT NULL,
    data TEXT,
    config TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    accuracy REAL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS buyers (
    master TEXT NOT NULL REFERENCES masters(name),
    id INTEGER NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('reserved', 'issued')),
    owner TEXT,
    codeword TEXT,
    file TEXT,
    sha256 TEXT,
    agreement REAL,
    accuracy REAL,
    margin REAL,
    cosine REAL,
    created REAL NOT NULL,
    PRIMARY KEY (master, id),
    UNIQUE (master, name)
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    action TEXT NOT NULL,
    master TEXT,
    detail TEXT NOT NULL
);
"""


@dataclass
class Master:
    name: str
    weights: Path
    weights_sha256: str
    factory: str
    data: str | None
    config: dict
    key_fingerprint: str
    accuracy: float | None


@dataclass
class Buyer:
    master: str
    id: int
    name: str
    status: str
    file: str | None = None
    sha256: str | None = None
    agreement: float | None = None
    accuracy: float | None = None
    margin: float | None = None
    codeword: str | None = None
    # Mean cosine similarity of the copy's outputs to the master's (encoders; None for classifiers).
    cosine: float | None = None
    extra: dict = field(default_factory=dict)

    def public(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "master": self.master,
            "status": self.status,
            "file": self.file,
            "sha256": self.sha256,
            "agreement": self.agreement,
            "accuracy": self.accuracy,
            "cosine": self.cosine,
        }


def default_path() -> Path:
    return Path(os.environ.get("WMTRACE_REGISTRY") or Path.cwd() / "registry")


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(owner: str | None) -> bool:
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True  # cannot tell for another machine; leave it alone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


class Registry:
    def __init__(self, root: str | os.PathLike | None = None, create: bool = False):
        self.root = Path(root) if root is not None else default_path()
        db = self.root / DB_NAME
        if not db.exists():
            if not create:
                raise BadInput(f"no wmtrace registry at {self.root} (run 'wmtrace init' or 'wmtrace issue')")
            try:
                (self.root / "keys").mkdir(parents=True, exist_ok=True, mode=0o700)
                (self.root / "masters").mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise BadInput(f"{self.root}: cannot create registry ({e.strerror})") from e
        try:
            self.conn = sqlite3.connect(db, timeout=60, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA busy_timeout = 60000")
            self.conn.execute("PRAGMA foreign_keys = ON")
            self.conn.executescript(SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise BadInput(f"{db}: not a usable wmtrace registry ({e})") from e

    def _migrate(self) -> None:
        """Columns added since a registry was created; old registries keep working."""
        have = {r["name"] for r in self.conn.execute("PRAGMA table_info(buyers)")}
        if "cosine" not in have:
            try:
                self.conn.execute("ALTER TABLE buyers ADD COLUMN cosine REAL")
            except sqlite3.OperationalError:  # added by a process opening it at the same time, or read-only
                pass

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """IMMEDIATE: take the write lock up front, so read-then-write sequences are atomic."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise BadInput(f"registry {self.root} is busy or unwritable ({e})") from e
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.OperationalError as e:
                self.conn.execute("ROLLBACK")
                raise BadInput(f"registry {self.root}: cannot write ({e})") from e

    def audit(self, conn: sqlite3.Connection, action: str, master: str | None, **detail) -> None:
        conn.execute(
            "INSERT INTO audit (at, action, master, detail) VALUES (?, ?, ?, ?)",
            (time.time(), action, master, json.dumps(detail, sort_keys=True)),
        )

    # Keys ------------------------------------------------------------------------------------
    def key_path(self, master: str) -> Path:
        return self.root / "keys" / f"{master}.key"

    def key(self, master: str) -> bytes:
        return keys.read(self.key_path(master))

    # Masters ---------------------------------------------------------------------------------
    def add_master(self, m: Master) -> None:
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM masters WHERE name = ?", (m.name,)).fetchone():
                raise BadInput(f"master {m.name!r} is already registered")
            c.execute(
                "INSERT INTO masters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    m.name,
                    str(m.weights.relative_to(self.root)),
                    m.weights_sha256,
                    m.factory,
                    m.data,
                    json.dumps(m.config, sort_keys=True),
                    m.key_fingerprint,
                    m.accuracy,
                    time.time(),
                ),
            )
            self.audit(c, "init", m.name, factory=m.factory, weights_sha256=m.weights_sha256)

    def _master(self, row: sqlite3.Row) -> Master:
        return Master(
            row["name"],
            self.root / row["weights"],
            row["weights_sha256"],
            row["factory"],
            row["data"],
            json.loads(row["config"]),
            row["key_fingerprint"],
            row["accuracy"],
        )

    def masters(self) -> list[Master]:
        return [self._master(r) for r in self.conn.execute("SELECT * FROM masters ORDER BY created")]

    def master(self, name: str | None = None) -> Master:
        """The named master, or the only one when no name is given."""
        ms = self.masters()
        if name is None:
            if len(ms) == 1:
                return ms[0]
            if not ms:
                raise BadInput(f"registry {self.root} has no master yet (run 'wmtrace init')")
            names = ", ".join(m.name for m in ms)
            raise BadInput(f"registry has several masters ({names}); choose one with --master")
        for m in ms:
            if m.name == name:
                return m
        raise BadInput(f"unknown master {name!r} in registry {self.root}")

    # Buyers ----------------------------------------------------------------------------------
    def _buyer(self, r: sqlite3.Row) -> Buyer:
        return Buyer(
            r["master"], r["id"], r["name"], r["status"], r["file"], r["sha256"],
            r["agreement"], r["accuracy"], r["margin"], r["codeword"],
            cosine=r["cosine"] if "cosine" in r.keys() else None,
        )

    def buyers(self, master: str | None = None, status: str | None = "issued") -> list[Buyer]:
        q, args = "SELECT * FROM buyers WHERE 1=1", []
        if master is not None:
            q, args = q + " AND master = ?", [*args, master]
        if status is not None:
            q, args = q + " AND status = ?", [*args, status]
        return [self._buyer(r) for r in self.conn.execute(q + " ORDER BY master, id", args)]

    def buyer(self, master: str, buyer_id: int) -> Buyer | None:
        r = self.conn.execute("SELECT * FROM buyers WHERE master = ? AND id = ?", (master, buyer_id)).fetchone()
        return self._buyer(r) if r else None

    def reserve(self, master: str, names: list[str | None]) -> list[Buyer]:
        """Reserve one new ID per name (None: a generated name), taking over reservations
        whose process is gone first, so an interrupted run is resumed, not duplicated."""
        owner = _owner()
        out: list[Buyer] = []
        with self.transaction() as c:
            stale = [
                r for r in c.execute(
                    "SELECT * FROM buyers WHERE master = ? AND status = 'reserved' ORDER BY id", (master,)
                )
                if not _owner_alive(r["owner"])
            ]
            wanted = list(names)
            for r in stale:
                # A stale reservation completes a wanted name, or stands in for a generated one.
                slot = r["name"] if r["name"] in wanted else (None if None in wanted else False)
                if slot is False:
                    continue
                wanted.remove(slot)
                c.execute("UPDATE buyers SET owner = ? WHERE master = ? AND id = ?", (owner, master, r["id"]))
                out.append(self._buyer(r))
            (top,) = c.execute("SELECT COALESCE(MAX(id), 0) FROM buyers WHERE master = ?", (master,)).fetchone()
            for i, name in enumerate(wanted, start=top + 1):
                name = name or f"buyer-{i:04d}"
                try:
                    c.execute(
                        "INSERT INTO buyers (master, id, name, status, owner, created) "
                        "VALUES (?, ?, ?, 'reserved', ?, ?)",
                        (master, i, name, owner, time.time()),
                    )
                except sqlite3.IntegrityError as e:
                    raise BadInput(f"buyer name {name!r} is already registered for master {master!r}") from e
                out.append(Buyer(master, i, name, "reserved"))
            self.audit(c, "reserve", master, ids=[b.id for b in out])
        return out

    def complete(self, b: Buyer) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE buyers SET status = 'issued', owner = NULL, codeword = ?, file = ?, sha256 = ?, "
                "agreement = ?, accuracy = ?, margin = ?, cosine = ? WHERE master = ? AND id = ?",
                (b.codeword, b.file, b.sha256, b.agreement, b.accuracy, b.margin, b.cosine, b.master, b.id),
            )
            self.audit(c, "issue", b.master, id=b.id, name=b.name, sha256=b.sha256, file=b.file)

    def release(self, master: str, ids: list[int]) -> None:
        """Drop reservations that this process will not complete (e.g. after an error)."""
        with self.transaction() as c:
            for i in ids:
                c.execute(
                    "DELETE FROM buyers WHERE master = ? AND id = ? AND status = 'reserved'", (master, i)
                )
            self.audit(c, "release", master, ids=ids)

    def log_trace(
        self, file: str, verdict: str, master: str | None, buyer: int | None, colluders: list[int] | None = None
    ) -> None:
        extra = {"colluders": colluders} if colluders else {}
        with self.transaction() as c:
            self.audit(c, "trace", master, file=file, verdict=verdict, buyer=buyer, **extra)

    def audit_log(self, limit: int = 100) -> list[dict]:
        rows = self.conn.execute("SELECT * FROM audit ORDER BY seq DESC LIMIT ?", (limit,))
        return [
            {"seq": r["seq"], "at": r["at"], "action": r["action"], "master": r["master"],
             "detail": json.loads(r["detail"])}
            for r in rows
        ]
