import multiprocessing as mp
import socket
import sqlite3
from pathlib import Path

import pytest

from wmtrace.errors import BadInput
from wmtrace.registry import Master, Registry


def _master(reg: Registry, name: str = "m") -> Master:
    weights = reg.root / "masters" / f"{name}.safetensors"
    weights.write_bytes(b"x")
    m = Master(name, weights, "0" * 64, "pkg:build", None, {"carriers": []}, "f" * 16, 0.9)
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
    Registry(tmp_path, create=True)
    with Registry(tmp_path) as reg:
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
