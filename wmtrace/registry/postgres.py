"""The PostgreSQL backend: one registry shared by every host that issues or traces (psycopg 3).

What SQLite guarantees on one machine holds here across hosts. IDs are reserved under a per-master
transaction-scoped advisory lock, so no ID is handed out twice; a reservation carries a lease (server
clock) renewed by a heartbeat while its process lives, and `reserve` takes over expired ones, so a
worker killed anywhere is resumed, not duplicated. `complete` works from any process (issuing on Ray
completes on workers) but only once per reservation. Master keys and the seller's signing key are stored
sealed under the operator's KEK (`keystore`), never in the clear; master files live in a storage
(`storage`) recorded at creation. The audit log is the signed chain of `ledger.Ledger`; appends from any
host are serialized by an advisory lock, so the chain never forks. The schema is versioned: `MIGRATIONS`
are applied in order at connect, and a newer one is refused.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import psycopg
from psycopg.rows import dict_row

from ..errors import BadInput
from ..evidence.signing import SigningKey
from . import keystore
from .ledger import Ledger
from .location import mask
from .owners import Heartbeat, lease_owner, lease_seconds
from .records import Buyer, Master, MasterConfig, buyers_query, claim_stale, pick_master
from .storage import Storage
from .store import Paths

NOW = "EXTRACT(EPOCH FROM clock_timestamp())::double precision"  # the server's clock: hosts' clocks may differ
LOCK_ID = 0x776D7472  # pg_advisory_lock key of the registry-wide lock ("wmtr")
MIGRATIONS: list[str] = [
    # 1: the tables.
    """
    CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE masters (
        name TEXT PRIMARY KEY, weights TEXT NOT NULL, weights_sha256 TEXT NOT NULL, factory TEXT NOT NULL,
        data TEXT, config TEXT NOT NULL, key_fingerprint TEXT NOT NULL, accuracy DOUBLE PRECISION,
        created DOUBLE PRECISION NOT NULL);
    CREATE TABLE master_keys (
        master TEXT PRIMARY KEY, nonce BYTEA NOT NULL, sealed BYTEA NOT NULL, kek_fingerprint TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL);
    CREATE TABLE buyers (
        master TEXT NOT NULL REFERENCES masters(name), id INTEGER NOT NULL, name TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('reserved', 'issued')), owner TEXT, lease_until DOUBLE PRECISION,
        codeword TEXT, file TEXT, sha256 TEXT, agreement DOUBLE PRECISION, accuracy DOUBLE PRECISION,
        margin DOUBLE PRECISION, cosine DOUBLE PRECISION, created DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (master, id), UNIQUE (master, name));
    CREATE TABLE audit (
        seq BIGSERIAL PRIMARY KEY, at DOUBLE PRECISION NOT NULL, action TEXT NOT NULL, master TEXT,
        detail TEXT NOT NULL);
    """,
    # 2: reservations found by lease without reading issued buyers (takeover scans on every reserve).
    "CREATE INDEX buyers_reserved ON buyers (master, lease_until) WHERE status = 'reserved'",
    # 3: evidence (`ledger`). A master's commitment nonce sits in its row: it hides a 256-bit random key, whose
    # secrecy does not rest on it, and is revealed with the key anyway. The seller's seed is sealed like a key.
    """
    ALTER TABLE masters ADD COLUMN key_commitment TEXT, ADD COLUMN commit_nonce TEXT,
        ADD COLUMN committed_at DOUBLE PRECISION, ADD COLUMN committed_in TEXT;
    ALTER TABLE buyers ADD COLUMN statement INTEGER, ADD COLUMN ack TEXT;
    ALTER TABLE audit ADD COLUMN prev TEXT, ADD COLUMN hash TEXT, ADD COLUMN sig TEXT;
    CREATE TABLE statements (
        number INTEGER PRIMARY KEY, master TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, root TEXT NOT NULL,
        buyers INTEGER NOT NULL, body TEXT NOT NULL);
    CREATE TABLE seller (
        id INTEGER PRIMARY KEY CHECK (id = 1), public TEXT NOT NULL, nonce BYTEA NOT NULL, sealed BYTEA NOT NULL,
        kek_fingerprint TEXT NOT NULL, created DOUBLE PRECISION NOT NULL);
    """,
    # 4: revocations and reveals found without reading the whole log (every trace and issue asks).
    "CREATE INDEX audit_action ON audit (action, master)",
]
MASTER_COLUMNS = "name, weights, weights_sha256, factory, data, config, key_fingerprint, accuracy, created"


def _connect(url: str) -> psycopg.Connection:
    try:
        return psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=30)
    except psycopg.Error as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise BadInput(f"registry {mask(url)}: cannot connect ({reason})") from None


class Registry(Ledger, Paths):
    """A registry in a PostgreSQL database. `create=True` lays out the schema in an empty database and
    records the storage (`storage`, else $WMTRACE_STORAGE, else ./wmtrace-storage) every client then uses."""

    location: str = ""  # the URL without its password
    MARK = "%s"

    def __init__(self, url: str, create: bool = False, storage: str | None = None):
        self.url, self.location = url, mask(url)
        self.conn = _connect(url)
        self.owner, self.lease = lease_owner(), lease_seconds()
        self._heartbeat = Heartbeat(self._renew, self.lease)
        self._lock_conn: psycopg.Connection | None = None
        self._lock_depth = 0
        try:
            self._migrate(create, storage)
            self.storage = Storage(self._setting("storage"))
        except BaseException:
            self.conn.close()
            raise
        self.layout, self.root = self.storage.layout, self.storage.root
        self.storage.prepare()

    # Schema ----------------------------------------------------------------------------------
    def _migrate(self, create: bool, storage: str | None) -> None:
        """Bring the schema to `len(MIGRATIONS)` in one transaction (serialized by an advisory lock)."""
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID + 1,))
            exists = self.conn.execute("SELECT to_regclass('schema_version') IS NOT NULL AS t").fetchone()["t"]
            if not exists:
                if not create:
                    raise BadInput(f"no wmtrace registry at {self.location} (run 'wmtrace init' or 'wmtrace issue')")
                self.conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                self.conn.execute("INSERT INTO schema_version VALUES (0)")
            version = self.conn.execute("SELECT version FROM schema_version").fetchone()["version"]
            if version > len(MIGRATIONS):
                raise BadInput(f"registry {self.location} has schema version {version}, written by a newer wmtrace "
                               f"(this one knows up to {len(MIGRATIONS)}); upgrade wmtrace")
            try:
                for v in range(version, len(MIGRATIONS)):
                    self.conn.execute(MIGRATIONS[v])
            except psycopg.Error as e:
                raise BadInput(f"registry {self.location}: cannot apply schema version {v + 1} ({e})") from None
            self.conn.execute("UPDATE schema_version SET version = %s", (len(MIGRATIONS),))
            if version == 0:
                where = storage or os.environ.get("WMTRACE_STORAGE") or os.path.abspath("wmtrace-storage")
                self.conn.execute("INSERT INTO settings VALUES ('storage', %s)", (where,))

    def schema_version(self) -> int:
        return self.conn.execute("SELECT version FROM schema_version").fetchone()["version"]

    def _setting(self, name: str) -> str:
        return self.conn.execute("SELECT value FROM settings WHERE name = %s", (name,)).fetchone()["value"]

    def close(self) -> None:
        self._heartbeat.stop()
        for c in (self._lock_conn, getattr(self, "_beat_conn", None), self.conn):
            if c is not None:
                c.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rows(self, sql: str, args: tuple | list = ()) -> list[dict]:
        return self.conn.execute(sql, args).fetchall()

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection]:
        try:
            with self.conn.transaction():
                yield self.conn
        except psycopg.errors.UniqueViolation as e:
            raise BadInput(f"registry {self.location}: {e.diag.message_detail or e}") from None
        except psycopg.OperationalError as e:
            raise BadInput(f"registry {self.location}: cannot write ({e})") from None

    # The ledger's hooks (`ledger.Ledger`).
    def _write(self):
        return self._tx()

    def _now(self, c: psycopg.Connection) -> float:
        return c.execute(f"SELECT {NOW} AS now").fetchone()["now"]

    def _chain_lock(self, c: psycopg.Connection) -> None:
        """Held to the end of the transaction: two hosts appending at once take turns, so each links to
        the other's entry rather than both to the same one (a fork)."""
        c.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID + 2,))

    def _load_seller(self) -> bytes | None:
        rows = self._rows("SELECT * FROM seller WHERE id = 1")
        if not rows:
            return None
        r = rows[0]
        return keystore.unseal_seller(keystore.load_kek(), bytes(r["nonce"]), bytes(r["sealed"]),
                                      r["kek_fingerprint"])

    def _save_seller(self, seed: bytes) -> None:
        """Sealed under the KEK, committed on a connection of its own (a key made inside a transaction that
        rolls back would sign what follows, yet be gone); a seed stored meanwhile by another process stands:
        the caller reads back the one stored."""
        kek = keystore.load_kek()
        nonce, sealed = keystore.seal_seller(kek, seed)
        with _connect(self.url) as c:
            c.execute("INSERT INTO seller VALUES (1, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                      (SigningKey(seed).public.raw.hex(), nonce, sealed, keystore.kek_fingerprint(kek), time.time()))

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Registry-wide, on a connection of its own (the server releases it if this process dies)."""
        if self._lock_depth == 0:
            self._lock_conn = _connect(self.url)
            self._lock_conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                self._lock_conn.close()  # closing the session releases the lock
                self._lock_conn = None

    # Keys ------------------------------------------------------------------------------------
    def fingerprint(self, master: str) -> str | None:
        rows = self._rows("SELECT key_fingerprint FROM masters WHERE name = %s", (master,))
        return rows[0]["key_fingerprint"] if rows else None

    def has_key(self, master: str) -> bool:
        return bool(self._rows("SELECT 1 FROM master_keys WHERE master = %s", (master,)))

    def store_key(self, master: str, key: bytes) -> None:
        kek = keystore.load_kek()
        nonce, sealed = keystore.seal(kek, master, key)
        with self._tx() as c:
            cur = c.execute("INSERT INTO master_keys VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                            (master, nonce, sealed, keystore.kek_fingerprint(kek), time.time()))
            if cur.rowcount != 1:
                raise BadInput(f"registry {self.location}: master {master!r} already has a key; refusing to overwrite")

    def key(self, master: str) -> bytes:
        rows = self._rows("SELECT * FROM master_keys WHERE master = %s", (master,))
        if not rows:
            raise BadInput(f"registry {self.location}: no key for master {master!r}; restore it from a backup")
        r = rows[0]
        key = keystore.unseal(keystore.load_kek(), master, bytes(r["nonce"]), bytes(r["sealed"]), r["kek_fingerprint"])
        return self._check_fingerprint(master, key, f"registry {self.location}")

    # Masters ---------------------------------------------------------------------------------
    def add_master(self, m: Master, log: bool = True) -> None:
        self.storage.upload([m.weights, self.moments_path(m.weights), self.template_path(m.weights)])
        with self._tx() as c:
            if c.execute("SELECT 1 FROM masters WHERE name = %s", (m.name,)).fetchone():
                raise BadInput(f"master {m.name!r} is already registered")
            c.execute(f"INSERT INTO masters ({MASTER_COLUMNS}) VALUES ({', '.join(['%s'] * 9)})",
                      (m.name, m.weights.relative_to(self.root).as_posix(), m.weights_sha256, m.factory, m.data,
                       json.dumps(m.config.to_json(), sort_keys=True), m.key_fingerprint, m.accuracy, time.time()))
            if log:  # not when copied by `registry migrate`: its commitment comes with `import_records`
                self._log_init(c, m)

    def _master(self, row: dict) -> Master:
        weights = self.storage.fetch(self.root / row["weights"], row["weights_sha256"])
        for extra in (self.moments_path(weights), self.template_path(weights)):
            self.storage.fetch(extra)
        return Master(row["name"], weights, row["weights_sha256"], row["factory"], row["data"],
                      MasterConfig.from_json(json.loads(row["config"]), row["name"]), row["key_fingerprint"],
                      row["accuracy"])

    def masters(self) -> list[Master]:
        return [self._master(r) for r in self._rows("SELECT * FROM masters ORDER BY created")]

    def master(self, name: str | None = None) -> Master:
        """The named master, or the only one when no name is given."""
        return pick_master(self.masters(), name, self.location)

    # Buyers ----------------------------------------------------------------------------------
    @staticmethod
    def _buyer(r: dict) -> Buyer:
        return Buyer(r["master"], r["id"], r["name"], r["status"], r["file"], r["sha256"], r["agreement"],
                     r["accuracy"], r["margin"], r["codeword"], cosine=r["cosine"])

    def buyers(self, master: str | None = None, status: str | None = "issued") -> list[Buyer]:
        return [self._buyer(r) for r in self._rows(*buyers_query(master, status, "%s"))]

    def buyer(self, master: str, buyer_id: int) -> Buyer | None:
        rows = self._rows("SELECT * FROM buyers WHERE master = %s AND id = %s", (master, buyer_id))
        return self._buyer(rows[0]) if rows else None

    def issued_ids(self, master: str) -> np.ndarray:
        rows = self.conn.execute("SELECT id FROM buyers WHERE master = %s AND status = 'issued' ORDER BY id",
                                 (master,), prepare=False).fetchall()
        return np.fromiter((r["id"] for r in rows), np.int64, len(rows))

    def reserve(self, master: str, names: list[str | None]) -> list[Buyer]:
        """One new ID per name (None: generated), expired reservations taken over first; leased to this
        process and renewed by its heartbeat until completed or released."""
        out: list[Buyer] = []
        with self._tx() as c:
            c.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_ID, master))
            stale = c.execute(f"SELECT * FROM buyers WHERE master = %s AND status = 'reserved' AND "
                              f"(lease_until IS NULL OR lease_until < {NOW}) ORDER BY id", (master,)).fetchall()
            wanted = list(names)
            for r in claim_stale(stale, wanted):
                c.execute(f"UPDATE buyers SET owner = %s, lease_until = {NOW} + %s WHERE master = %s AND id = %s",
                          (self.owner, self.lease, master, r["id"]))
                out.append(self._buyer(r))
            top = c.execute("SELECT COALESCE(MAX(id), 0) AS top FROM buyers WHERE master = %s", (master,)).fetchone()
            for i, name in enumerate(wanted, start=top["top"] + 1):
                name = name or f"buyer-{i:04d}"
                if c.execute("SELECT 1 FROM buyers WHERE master = %s AND name = %s", (master, name)).fetchone():
                    raise BadInput(f"buyer name {name!r} is already registered for master {master!r}")
                c.execute(f"INSERT INTO buyers (master, id, name, status, owner, lease_until, created) "
                          f"VALUES (%s, %s, %s, 'reserved', %s, {NOW} + %s, %s)",
                          (master, i, name, self.owner, self.lease, time.time()))
                out.append(Buyer(master, i, name, "reserved"))
            self.audit(c, "reserve", master, ids=[b.id for b in out], owner=self.owner)
        if out:
            self._heartbeat.start()
        return out

    def _renew(self) -> None:
        """The heartbeat: extend every lease this process holds (on its own connection, from its thread)."""
        if not hasattr(self, "_beat_conn"):
            self._beat_conn = _connect(self.url)
        self._beat_conn.execute(f"UPDATE buyers SET lease_until = {NOW} + %s WHERE owner = %s AND status = 'reserved'",
                                (self.lease, self.owner))

    def complete(self, b: Buyer) -> None:
        """Record an issued copy; from any process, once (a reservation already completed is refused)."""
        with self._tx() as c:
            cur = c.execute(
                "UPDATE buyers SET status = 'issued', owner = NULL, lease_until = NULL, codeword = %s, file = %s, "
                "sha256 = %s, agreement = %s, accuracy = %s, margin = %s, cosine = %s "
                "WHERE master = %s AND id = %s AND status = 'reserved'",
                (b.codeword, b.file, b.sha256, b.agreement, b.accuracy, b.margin, b.cosine, b.master, b.id))
            if cur.rowcount != 1:
                raise BadInput(f"buyer {b.id} of master {b.master!r} is not reserved (completed or released already)")
            self.audit(c, "issue", b.master, id=b.id, name=b.name, sha256=b.sha256, file=b.file)

    def release(self, master: str, ids: list[int]) -> None:
        """Drop reservations this process will not complete."""
        with self._tx() as c:
            # Only this process's: a reservation taken over after its lease ran out is another's now.
            c.execute("DELETE FROM buyers WHERE master = %s AND id = ANY(%s) AND status = 'reserved' AND owner = %s",
                      (master, ids, self.owner))
            self.audit(c, "release", master, ids=ids)

    def import_records(self, buyers: list[Buyer], audit: list[dict], records: dict | None = None) -> None:
        """Rows copied in by `registry migrate`, in one transaction; audit rows keep their seq, so the
        sequence is moved past them."""
        with self._tx() as c:
            self._import(c, buyers, audit, records)
            c.execute("SELECT setval(pg_get_serial_sequence('audit', 'seq'), COALESCE(MAX(seq), 0) + 1, false) "
                      "FROM audit")
