import multiprocessing as mp
import os
import socket
import sqlite3
import stat
from pathlib import Path

import pytest

from wmtrace.coding import keys
from wmtrace.coding.codes import CodeSpec
from wmtrace.errors import BadInput
from wmtrace.registry import Master, MasterConfig, Registry

CONFIG = MasterConfig(CodeSpec(), {})


def _master(reg: Registry, name: str = "m") -> Master:
    with reg.lock():
        weights = reg.weights_path(name)
        weights.write_bytes(b"x")
        key = keys.generate()
        reg.store_key(name, key)  # a master's key is stored first: registering commits to it
        m = Master(name, weights, "0" * 64, "pkg:build", None, CONFIG, keys.fingerprint(key), 0.9)
        reg.add_master(m)
    return m


def _reserve(root: str, n: int, q) -> None:
    with Registry(root) as reg:
        q.put([b.id for _ in range(n) for b in reg.reserve("m", [None])])


def test_unknown_registry_is_an_error_and_is_not_created(tmp_path):
    with pytest.raises(BadInput, match="no wmtrace registry"):
        Registry(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_corrupt_database_is_a_clear_error(tmp_path):
    (tmp_path / "wmtrace.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(BadInput, match="not a usable wmtrace registry"):
        Registry(tmp_path)


def test_reserve_complete_and_audit(tmp_path):
    reg = Registry(tmp_path, create=True)
    _master(reg)
    a, b = reg.reserve("m", [None, "acme"])
    assert (a.id, b.id, b.name) == (1, 2, "acme")
    assert reg.buyers("m") == []  # reserved is not issued
    b.status, b.file, b.sha256 = "issued", "f", "s"
    reg.complete(b)
    assert [x.name for x in reg.buyers("m")] == ["acme"]
    with pytest.raises(BadInput, match="already registered"):
        reg.reserve("m", ["acme"])
    actions = [e["action"] for e in reg.audit_log()]
    assert actions[:2] == ["issue", "reserve"]


def test_stale_reservation_is_resumed_not_duplicated(tmp_path):
    reg = Registry(tmp_path, create=True)
    _master(reg)
    reg.reserve("m", [None, None])
    # Pretend the reserving process died.
    reg.conn.execute("UPDATE buyers SET owner = ?", (f"{socket.gethostname()}:999999",))
    again = reg.reserve("m", [None, None, None])
    assert sorted(b.id for b in again) == [1, 2, 3]


def test_concurrent_processes_never_share_an_id(tmp_path):
    with Registry(tmp_path, create=True) as reg:
        _master(reg)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_reserve, args=(str(tmp_path), 15, q)) for _ in range(4)]
    for p in procs:
        p.start()
    ids = [i for _ in procs for i in q.get(timeout=60)]
    for p in procs:
        p.join(timeout=60)
    assert len(ids) == 60 and len(set(ids)) == 60
    rows = sqlite3.connect(Path(tmp_path) / "wmtrace.db").execute("SELECT COUNT(*) FROM buyers").fetchone()
    assert rows[0] == 60


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_opening_for_creation_writes_nothing_until_the_first_write(tmp_path):
    reg = Registry(tmp_path / "new", create=True)
    assert reg.masters() == [] and reg.buyers() == [] and reg.audit_log() == []
    assert not (tmp_path / "new").exists()
    _master(reg)
    root = tmp_path / "new"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "keys").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "wmtrace.db").stat().st_mode) == 0o600  # it holds codewords and the audit log
    assert [m.name for m in Registry(root).masters()] == ["m"]


@pytest.mark.parametrize("kind", ["empty", "foreign"])
def test_an_emptied_database_is_refused_not_recreated(tmp_path, kind):
    """A 0-byte (or schema-less) wmtrace.db next to keys was once silently re-created as an empty
    registry: every issued copy became untraceable, and the next init deleted the key."""
    reg = Registry(tmp_path, create=True)
    _master(reg)
    reg.close()
    (tmp_path / "wmtrace.db").write_bytes(b"")
    if kind == "foreign":  # a real SQLite file, but not ours
        sqlite3.connect(tmp_path / "wmtrace.db").execute("CREATE TABLE notes (x)").connection.commit()
    before = tree(tmp_path)
    for create in (False, True):
        with pytest.raises(BadInput, match="not a wmtrace registry database"):
            Registry(tmp_path, create=create)
    assert tree(tmp_path) == before


def test_keys_without_a_database_are_never_given_a_fresh_one(tmp_path):
    reg = Registry(tmp_path, create=True)
    _master(reg)
    reg.close()
    os.remove(tmp_path / "wmtrace.db")
    before = tree(tmp_path)
    with pytest.raises(BadInput, match="restore the registry from a backup"):
        Registry(tmp_path, create=True)
    assert tree(tmp_path) == before


def test_a_key_that_is_not_the_registered_one_is_refused(tmp_path):
    reg = Registry(tmp_path, create=True)
    key = keys.generate()
    with reg.lock():
        keys.write(reg.key_path("m"), key)
        m = Master("m", reg.weights_path("m"), "0" * 64, "pkg:build", None, CONFIG, keys.fingerprint(key), None)
        reg.add_master(m)
    assert reg.key("m") == key
    os.remove(reg.key_path("m"))
    keys.write(reg.key_path("m"), keys.generate())
    with pytest.raises(BadInput, match="does not belong to master 'm'"):
        reg.key("m")


def test_the_registry_lock_is_reentrant_and_exclusive_across_processes(tmp_path):
    reg = Registry(tmp_path, create=True)
    ctx = mp.get_context("spawn")
    with reg.lock(), reg.lock():
        p = ctx.Process(target=_take_lock, args=(str(tmp_path),))
        p.start()
        p.join(timeout=3)
        assert p.is_alive(), "another process took the lock while it was held"
    p.join(timeout=60)
    assert p.exitcode == 0


def _take_lock(root: str) -> None:
    with Registry(root).lock():
        pass


def test_the_sqlite_registry_implements_the_backend_protocol():
    from wmtrace.registry.base import _conforms

    assert list(_conforms(Registry)) == []


def test_a_stored_key_is_never_overwritten(tmp_path):
    reg = Registry(tmp_path, create=True)
    key = keys.generate()
    assert not reg.has_key("m")
    reg.store_key("m", key)
    assert reg.has_key("m") and stat.S_IMODE(reg.key_path("m").stat().st_mode) == 0o600
    with pytest.raises(BadInput, match="refusing to overwrite"):
        reg.store_key("m", keys.generate())
    assert keys.read(reg.key_path("m")) == key
