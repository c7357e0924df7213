"""The registry's database (SQLite): masters, buyers and an audit log; files are `store`'s.

Buyer IDs are reserved inside an IMMEDIATE transaction, so two issuing processes on one registry
never hand out the same ID; a reservation whose process died is taken over by the next `issue`,
so an interrupted run resumes rather than leaving holes. An existing database file is used only
when it holds this schema: an emptied or foreign file is refused, never silently replaced.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from ..coding import keys
from ..errors import BadInput
from .ledger import Ledger
from .owners import pid_alive as _owner_alive
from .owners import pid_owner as _owner
from .records import Buyer, Master, MasterConfig, buyers_query, claim_stale, pick_master
from .store import Files, Layout, default_path

TABLES = ("masters", "buyers", "audit")
# Since 0.7 (evidence): statements, and the columns `_migrate` adds to registries made before.
STATEMENTS = """
CREATE TABLE IF NOT EXISTS statements (
    number INTEGER PRIMARY KEY, master TEXT NOT NULL, at REAL NOT NULL, root TEXT NOT NULL,
    buyers INTEGER NOT NULL, body TEXT NOT NULL
);"""
ADDED = {"buyers": ("cosine REAL", "statement INTEGER", "ack TEXT"),
         "masters": ("key_commitment TEXT", "commit_nonce TEXT", "committed_at REAL", "committed_in TEXT"),
         "audit": ("prev TEXT", "hash TEXT", "sig TEXT")}
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
    created REAL NOT NULL,
    key_commitment TEXT, commit_nonce TEXT, committed_at REAL, committed_in TEXT
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
    statement INTEGER,
    ack TEXT,
    PRIMARY KEY (master, id),
    UNIQUE (master, name)
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    action TEXT NOT NULL,
    master TEXT,
    detail TEXT NOT NULL,
    prev TEXT, hash TEXT, sig TEXT
);
""" + STATEMENTS
# Issued IDs read from the index alone (`issued_ids`); revocations and reveals without reading the whole log.
INDEXES = ("CREATE INDEX IF NOT EXISTS buyers_issued ON buyers (master, status, id)",
           "CREATE INDEX IF NOT EXISTS audit_action ON audit (action, master)")


class Registry(Ledger, Files):
    """One registry folder. With `create=True` nothing is written until the first write (a
    registration, a reservation): a command that fails its checks leaves no folder behind."""

    def __init__(self, root: str | os.PathLike | None = None, create: bool = False):
        self.layout = Layout(root if root is not None else default_path())
        self.root = self.layout.root
        self.conn: sqlite3.Connection | None = None
        self._lock_depth = 0
        if self.layout.db.exists() or self.layout.db.is_symlink():
            self._connect()
        elif not create:
            raise BadInput(f"no wmtrace registry at {self.root} (run 'wmtrace init' or 'wmtrace issue')")
        else:
            self.layout.refuse_orphans()  # checked again at creation; here so a command fails before any work

    def _connect(self) -> None:
        db = self.layout.db
        if not db.is_file():
            raise BadInput(f"{db}: not a regular file")
        try:
            conn = sqlite3.connect(db, timeout=60, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("PRAGMA foreign_keys = ON")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            raise BadInput(f"{db}: not a usable wmtrace registry ({e})") from e
        missing = [t for t in TABLES if t not in tables]
        if missing:
            conn.close()
            empty = " (the file is empty)" if db.stat().st_size == 0 else ""
            raise BadInput(
                f"{db}: not a wmtrace registry database{empty}, no {missing[0]!r} table; restore it from a backup "
                "(wmtrace registry restore) or move it away"
            )
        self.conn = conn
        self._migrate()

    def _db(self) -> sqlite3.Connection:
        """The connection, creating the registry on first write."""
        if self.conn is None:
            self.layout.create(SCHEMA)
            self._connect()
        return self.conn

    def _rows(self, sql: str, args: tuple | list = ()) -> list[sqlite3.Row]:
        """A read; a registry not created yet holds no rows."""
        return [] if self.conn is None else self.conn.execute(sql, args).fetchall()

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Registry-wide lock for registering masters (re-entrant within this object). Creates the
        registry: the lock lives in its folder."""
        self._db()
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with self.layout.locked():
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    def _migrate(self) -> None:
        """Columns and tables added since a registry was created; old registries keep working."""
        added = []
        for table, columns in ADDED.items():
            have = {r["name"] for r in self.conn.execute(f"PRAGMA table_info({table})")}
            added += [f"ALTER TABLE {table} ADD COLUMN {col}" for col in columns if col.split()[0] not in have]
        for sql in [*added, STATEMENTS, *INDEXES]:
            try:
                self.conn.execute(sql)
            except sqlite3.OperationalError:  # added by a process opening it at the same time, or read-only
                pass

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """IMMEDIATE: take the write lock up front, so read-then-write sequences are atomic."""
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise BadInput(f"registry {self.root} is busy or unwritable ({e})") from e
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.OperationalError as e:
                conn.execute("ROLLBACK")
                raise BadInput(f"registry {self.root}: cannot write ({e})") from e

    # The ledger's hooks (`ledger.Ledger`): appends serialized by the IMMEDIATE transaction itself.
    def _write(self):
        return self.transaction()

    def _chain_lock(self, c: sqlite3.Connection) -> None:
        pass

    def _load_seller(self) -> bytes | None:
        return keys.read(self.layout.seller) if self.layout.seller.exists() else None

    def _save_seller(self, seed: bytes) -> None:
        try:
            keys.write(self.layout.seller, seed)
        except BadInput:
            if not self.layout.seller.exists():  # lost a race with another process: its key stands
                raise

    # Keys ------------------------------------------------------------------------------------
    def fingerprint(self, master: str) -> str | None:
        rows = self._rows("SELECT key_fingerprint FROM masters WHERE name = ?", (master,))
        return rows[0][0] if rows else None

    # Masters ---------------------------------------------------------------------------------
    def add_master(self, m: Master, log: bool = True) -> None:
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM masters WHERE name = ?", (m.name,)).fetchone():
                raise BadInput(f"master {m.name!r} is already registered")
            c.execute(
                "INSERT INTO masters (name, weights, weights_sha256, factory, data, config, key_fingerprint, accuracy, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    m.name,
                    str(m.weights.relative_to(self.root)),
                    m.weights_sha256,
                    m.factory,
                    m.data,
                    json.dumps(m.config.to_json(), sort_keys=True),
                    m.key_fingerprint,
                    m.accuracy,
                    time.time(),
                ),
            )
            if log:  # not when copied by `registry migrate`: its commitment comes with `import_records`
                self._log_init(c, m)

    def _master(self, row: sqlite3.Row) -> Master:
        return Master(
            row["name"],
            self.root / row["weights"],
            row["weights_sha256"],
            row["factory"],
            row["data"],
            MasterConfig.from_json(json.loads(row["config"]), row["name"]),
            row["key_fingerprint"],
            row["accuracy"],
        )

    def masters(self) -> list[Master]:
        return [self._master(r) for r in self._rows("SELECT * FROM masters ORDER BY created")]

    def master(self, name: str | None = None) -> Master:
        """The named master, or the only one when no name is given."""
        return pick_master(self.masters(), name, self.location)

    # Buyers ----------------------------------------------------------------------------------
    def _buyer(self, r: sqlite3.Row) -> Buyer:
        return Buyer(
            r["master"], r["id"], r["name"], r["status"], r["file"], r["sha256"],
            r["agreement"], r["accuracy"], r["margin"], r["codeword"],
            cosine=r["cosine"] if "cosine" in r.keys() else None,
        )

    def buyers(self, master: str | None = None, status: str | None = "issued") -> list[Buyer]:
        return [self._buyer(r) for r in self._rows(*buyers_query(master, status, "?"))]

    def buyer(self, master: str, buyer_id: int) -> Buyer | None:
        rows = self._rows("SELECT * FROM buyers WHERE master = ? AND id = ?", (master, buyer_id))
        return self._buyer(rows[0]) if rows else None

    def issued_ids(self, master: str) -> np.ndarray:
        """Read from the (master, status, id) index alone, as plain tuples: 100,000 IDs in about 40 ms,
        against 320 ms through the table as `sqlite3.Row`s (BENCHMARKS.md *Trace at registry scale*)."""
        if self.conn is None:
            return np.zeros(0, np.int64)
        cur = self.conn.cursor()
        cur.row_factory = None
        cur.execute("SELECT id FROM buyers WHERE master = ? AND status = 'issued' ORDER BY id", (master,))
        ids = np.array(cur.fetchall(), dtype=np.int64).reshape(-1)
        return ids

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
            for r in claim_stale(stale, wanted):
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

    def import_records(self, buyers: list[Buyer], audit: list[dict], records: dict | None = None) -> None:
        with self.transaction() as c:
            self._import(c, buyers, audit, records)
