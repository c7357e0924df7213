"""The PostgreSQL registry on a real server (tests/pg.py): IDs, leases, sealed keys, schema versions,
storage, `registry migrate`, and the CLI end to end."""

import base64
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tests import pg as fixtures
from wmtrace import api, registry
from wmtrace.coding import keys
from wmtrace.coding.codes import CodeSpec
from wmtrace.errors import BadInput
from wmtrace.evidence import statement
from wmtrace.evidence.signing import PublicKey, SigningKey
from wmtrace.registry import Master, MasterConfig, keystore, mask
from wmtrace.registry import postgres as pg
from wmtrace.registry.base import _conforms

ROOT = Path(__file__).resolve().parents[1]
pg_server, pg_url, kek = fixtures.pg_server, fixtures.pg_url, fixtures.kek
CONFIG = MasterConfig(CodeSpec(), {})


def _master(reg, name: str = "m", key: bytes | None = None) -> Master:
    key = key or keys.generate()
    with reg.lock():
        weights = reg.weights_path(name)
        weights.write_bytes(b"x")
        reg.store_key(name, key)
        m = Master(name, weights, "0" * 64, "pkg:build", None, CONFIG, keys.fingerprint(key), 0.9)
        reg.add_master(m)
    return m


@pytest.fixture
def reg(pg_url, kek, tmp_path):
    r = registry.open(pg_url, create=True, storage=str(tmp_path / "storage"))
    yield r
    r.close()


def test_the_backend_conforms_to_the_protocol():
    assert list(_conforms(pg.Registry)) == []


def test_passwords_are_masked():
    assert mask("postgresql://u:s3cret@h:5432/db?sslmode=require") == "postgresql://u:***@h:5432/db?sslmode=require"
    assert mask("postgres://h/db?user=u&password=s3cret") == "postgres://h/db?user=u&password=***"
    assert mask("/srv/registry") == "/srv/registry"


def test_url_chooses_the_backend_and_a_missing_registry_is_an_error(pg_url, tmp_path):
    with pytest.raises(BadInput, match="no wmtrace registry at"):
        registry.open(pg_url)
    assert isinstance(registry.open(tmp_path / "r", create=True), registry.Registry)
    with pytest.raises(BadInput, match="cannot connect") as e:
        registry.open("postgresql://nobody:hunter2@127.0.0.1:1/none")
    assert "hunter2" not in str(e.value)


def test_reserve_complete_from_another_process_and_only_once(reg, pg_url):
    a, b = reg.reserve("m", [None, "acme"]) if _master(reg) else None
    assert (a.id, b.id, b.name) == (1, 2, "acme") and reg.buyers("m") == []
    b.status, b.file, b.sha256 = "issued", "f", "s"
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_complete, args=(pg_url, b))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert [x.name for x in reg.buyers("m")] == ["acme"]
    with pytest.raises(BadInput, match="not reserved"):
        reg.complete(b)
    with pytest.raises(BadInput, match="already registered"):
        reg.reserve("m", ["acme"])
    assert [e["action"] for e in reg.audit_log()][:2] == ["issue", "reserve"]


def _complete(url: str, b) -> None:
    with registry.open(url) as r:
        r.complete(b)


def _reserve(url: str, n: int, q) -> None:
    with registry.open(url) as r:
        q.put([b.id for _ in range(n) for b in r.reserve("m", [None])])


def test_concurrent_processes_never_share_an_id(reg, pg_url):
    _master(reg)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_reserve, args=(pg_url, 15, q)) for _ in range(4)]
    for p in procs:
        p.start()
    ids = [i for _ in procs for i in q.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
    assert sorted(ids) == list(range(1, 61))
    # 60 entries appended by four processes at once: one unbroken chain, no two entries after the same one.
    entries = reg.audit_chain()
    assert [e["action"] for e in entries] == ["chain-start", "init", *["reserve"] * 60]
    assert len({e["prev"] for e in entries}) == len(entries)
    check = reg.verify_chain()
    assert check["ok"] and check["signed"] == 62, check["problems"][:3]


def _log_traces(url: str) -> None:
    with registry.open(url) as r:
        for _ in range(15):
            r.log_trace("leak.safetensors", "not found", "m", None)


def test_hosts_appending_at_once_keep_one_chain(reg, pg_url):
    """Entries under no master's lock (traces) from four connections at once: the chain's advisory lock
    makes each follow the last committed one (without it, two follow the same entry and the chain forks)."""
    _master(reg)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(_log_traces, [pg_url] * 4))
    entries = reg.audit_chain()
    assert len(entries) == 62 and len({e["prev"] for e in entries}) == 62
    check = reg.verify_chain()
    assert check["ok"] and check["head"] == entries[-1]["hash"], check["problems"][:3]


def _seller(url: str) -> str:
    with registry.open(url) as r:
        return r.public_key().fingerprint


def test_the_seller_key_is_sealed_made_once_and_needs_the_kek(reg, pg_url, kek, monkeypatch):
    """Hosts creating the seller key at once agree on one; its seed is nowhere in the database in the clear
    (every text and bytea column scanned); sealed, it does not open as a master's key, nor without the KEK."""
    with ThreadPoolExecutor(4) as pool:
        made = set(pool.map(_seller, [pg_url] * 4))
    _master(reg)
    reg.reserve("m", [None])
    seed = reg.seller_key().seed
    assert made == {reg.public_key().fingerprint}
    forms = [seed.hex(), seed.hex().upper(), base64.b64encode(seed).decode(), kek.hex()]
    with psycopg.connect(pg_url) as c:
        columns = c.execute("SELECT table_name, column_name, data_type FROM information_schema.columns "
                            "WHERE table_schema = 'public' AND data_type IN ('text', 'bytea')").fetchall()
        assert ("seller", "sealed", "bytea") in columns and ("audit", "sig", "text") in columns
        for table, column, kind in columns:
            for (value,) in c.execute(f'SELECT "{column}" FROM "{table}" WHERE "{column}" IS NOT NULL'):
                if kind == "bytea":
                    assert seed not in bytes(value), (table, column)
                else:
                    assert not any(f in value for f in forms), (table, column)
        assert c.execute("SELECT count(*) FROM seller").fetchone()[0] == 1
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("INSERT INTO master_keys SELECT 'seller', nonce, sealed, kek_fingerprint, created FROM seller")
    with pytest.raises(BadInput, match="fails authentication"):
        reg.key("seller")
    monkeypatch.delenv("WMTRACE_KEK_FILE")
    monkeypatch.setenv("WMTRACE_KEK", os.urandom(32).hex())
    with registry.open(pg_url) as other, pytest.raises(BadInput, match="seller's signing key: key-encryption"):
        other.reserve("m", [None])


def _hold(url: str, lease: str, q) -> None:
    os.environ["WMTRACE_LEASE_SECONDS"] = lease
    r = registry.open(url)
    q.put([b.id for b in r.reserve("m", [None, None])])
    time.sleep(600)  # killed by the test


def test_leases_live_while_renewed_and_are_taken_over_once_expired(reg, pg_url, monkeypatch):
    """A live holder's heartbeat keeps its IDs past several leases; killed, they pass to the next reserve."""
    _master(reg)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_hold, args=(pg_url, "2", q))
    p.start()
    held = q.get(timeout=120)
    time.sleep(5)  # 2.5 leases: renewed every 0.5 s
    assert [b.id for b in reg.reserve("m", [None])] == [3]
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    time.sleep(2.5)  # one lease after the last renewal
    assert sorted(b.id for b in reg.reserve("m", [None, None, None])) == [*held, 4]
    owners = {r[0] for r in psycopg.connect(pg_url).execute("SELECT owner FROM buyers")}
    assert owners == {reg.owner}


def test_keys_are_sealed_and_need_the_right_kek(reg, pg_url, kek, monkeypatch, tmp_path):
    key = keys.generate()
    _master(reg, key=key)
    with psycopg.connect(pg_url) as c:
        dump = "\n".join(repr(row) for t in ("masters", "master_keys", "audit", "settings")
                         for row in c.execute(f"SELECT * FROM {t}"))
        raw = b"".join(bytes(r[0]) for r in c.execute("SELECT sealed FROM master_keys"))
    assert key.hex() not in dump and key not in raw and kek.hex() not in dump
    assert reg.key("m") == key
    monkeypatch.delenv("WMTRACE_KEK_FILE")
    assert [m.name for m in reg.masters()] == ["m"]  # listing needs no KEK
    with pytest.raises(BadInput, match="no key-encryption key"):
        reg.key("m")
    monkeypatch.setenv("WMTRACE_KEK", os.urandom(32).hex())
    with pytest.raises(BadInput, match="fingerprint check failed"):
        reg.key("m")
    loose = tmp_path / "loose-kek"
    loose.write_text(kek.hex())
    loose.chmod(0o644)
    monkeypatch.setenv("WMTRACE_KEK_FILE", str(loose))
    with pytest.raises(BadInput, match="accessible by other users"):
        reg.key("m")
    monkeypatch.setenv("WMTRACE_KEK", kek.hex())
    monkeypatch.delenv("WMTRACE_KEK_FILE")
    with psycopg.connect(pg_url, autocommit=True) as c:  # a sealed key moved to another master does not open
        c.execute("INSERT INTO master_keys SELECT 'other', nonce, sealed, kek_fingerprint, created FROM master_keys")
    with pytest.raises(BadInput, match="fails authentication"):
        reg.key("other")
    with pytest.raises(BadInput, match="refusing to overwrite"):
        reg.store_key("m", keys.generate())


def test_an_older_schema_is_upgraded_and_a_newer_one_refused(pg_url, kek, tmp_path, monkeypatch, caplog):
    """Rows written by a wmtrace of schema 1 (no chain): upgraded at connect; the first write starts the
    signed chain, committing to the master's key and the unsigned entries before it, and says so."""
    monkeypatch.setattr(pg, "MIGRATIONS", pg.MIGRATIONS[:1])
    key = keys.generate()
    with registry.open(pg_url, create=True, storage=str(tmp_path)) as old:
        old.store_key("m", key)
        assert old.schema_version() == 1
    with psycopg.connect(pg_url, autocommit=True) as c:  # what that wmtrace wrote: no column of the evidence
        c.execute("INSERT INTO masters VALUES ('m', 'masters/m.safetensors', %s, 'pkg:build', NULL, %s, %s, 0.9, 1)",
                  ("0" * 64, json.dumps(CONFIG.to_json()), keys.fingerprint(key)))
        c.execute("INSERT INTO buyers (master, id, name, status, created) VALUES ('m', 1, 'acme', 'reserved', 2)")
        c.execute("""INSERT INTO audit (at, action, master, detail) VALUES (3, 'reserve', 'm', '{"ids": [1]}')""")
    monkeypatch.undo()
    monkeypatch.setenv("WMTRACE_KEK_FILE", str(tmp_path / "kek"))
    (tmp_path / "kek").write_text(kek.hex())
    (tmp_path / "kek").chmod(0o600)
    with registry.open(pg_url) as new:
        assert new.schema_version() == len(pg.MIGRATIONS) == 4
        assert [b.name for b in new.buyers("m", status="reserved")] == ["acme"]
        new.release("m", [1])
        assert "started the signed audit log; committed to 1 earlier entries, 1 master key(s)" in caplog.text
        check = new.verify_chain()
        assert check["ok"] and (check["unsigned_before_chain"], check["signed"]) == (1, 2), check
        assert new.commitment("m")["key_commitment"]
        with psycopg.connect(pg_url) as c:
            assert c.execute("SELECT to_regclass('buyers_reserved') IS NOT NULL").fetchone()[0]
            c.execute("UPDATE schema_version SET version = 99")
            c.commit()
    with pytest.raises(BadInput, match="schema version 99, written by a newer wmtrace"):
        registry.open(pg_url)


def test_remote_storage_is_mirrored_and_checked(pg_url, kek, tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("WMTRACE_CACHE", str(tmp_path / "cache1"))
    with registry.open(pg_url, create=True, storage="memory://wmtrace-test/store") as r:
        weights = r.weights_path("m")
        weights.write_bytes(b"weights")
        key = keys.generate()
        r.store_key("m", key)
        r.add_master(Master("m", weights, keystore.hashlib.sha256(b"weights").hexdigest(), "pkg:build", None,
                            CONFIG, keys.fingerprint(key), None))
    monkeypatch.setenv("WMTRACE_CACHE", str(tmp_path / "cache2"))  # another host: nothing mirrored yet
    with registry.open(pg_url) as r:
        m = r.master("m")
        assert m.weights.is_relative_to(tmp_path / "cache2") and m.weights.read_bytes() == b"weights"
    fsspec.filesystem("memory").pipe("/wmtrace-test/store/masters/m.safetensors", b"altered")
    monkeypatch.setenv("WMTRACE_CACHE", str(tmp_path / "cache3"))
    with registry.open(pg_url) as r, pytest.raises(BadInput, match="differs from the registered sha256"):
        r.master("m")


# The CLI end to end -------------------------------------------------------------------------------
INIT = ["init", "--name", "small", "--placement", "minimal-norm", "--data", "tests.smalldata:unlabeled",
        "--schemes", "whitebox"]


def _with_password(url: str) -> tuple[str, str]:
    """The URL with a password in it, and how the CLI must show it: the server's own password (CI's), or
    `hunter2` for a private cluster, which trusts 127.0.0.1 and ignores it. The CLI must never print it."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    if not parts.password:
        netloc = f"{user}:hunter2@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        url = urlunsplit(parts._replace(netloc=netloc))
    return url, f"postgresql://{user}:***@"


def wmtrace(*args, registry: str, env: dict | None = None, wait: bool = True):
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    cmd = [sys.executable, "-m", "wmtrace", *map(str, args), "--registry", registry]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full, cwd=ROOT)
    if not wait:
        return p
    out, err = p.communicate(timeout=600)
    secret = urlsplit(registry).password if "://" in registry else None
    assert not secret or secret not in out + err
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _every_copy_traces(url: str, expected: int) -> None:
    with registry.open(url) as reg:
        buyers = reg.buyers()
        assert sorted(b.id for b in buyers) == list(range(1, expected + 1)), "a hole or a duplicate in the IDs"
        assert reg.buyers(status="reserved") == []
        for b in buyers:
            assert api.trace(b.file, reg).buyer == {"id": b.id, "name": b.name}


def test_cli_init_issue_trace(pg_url, kek, tmp_path, master_file):
    """`wmtrace init`, `issue`, `trace` against PostgreSQL, with a password in the URL that is never shown
    (the example's own strength search is the example's test: here its trained weights, registered as
    the concurrency test registers them)."""
    (url, shown), storage = _with_password(pg_url), tmp_path / "storage"
    env = {"WMTRACE_STORAGE": str(storage)}
    r = wmtrace(*INIT, "--weights", master_file, registry=url, env=env)
    assert r.returncode == 0 and shown in r.stdout, r.stderr
    r = wmtrace("issue", "--buyers", "2", "--eval-samples", "0", "--out", tmp_path / "out", "--json", registry=url)
    assert r.returncode == 0, r.stderr
    with registry.open(pg_url) as reg:
        assert (storage / "masters" / "small.safetensors").exists() and reg.root == storage
        b = reg.buyers()[1]
        check = reg.verify_chain()  # init and issue signed in one chain; the buyers stated, each with a receipt
        assert check["ok"] and check["statements"] == 1, check
        assert [e["action"] for e in reg.audit_chain()] == ["chain-start", "init", "reserve", "issue", "issue",
                                                             "statement"]
        receipt = json.loads((tmp_path / "out" / f"{b.name}.receipt.json").read_text())
        assert receipt == reg.receipts("small", [b.id])[b.id]
        assert statement.check_receipt(receipt, reg.public_key()) == []
    r = wmtrace("trace", b.file, "--json", registry=url)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["buyer"] == {"id": b.id, "name": b.name}
    r = wmtrace("trace", b.file, registry=url, env={"WMTRACE_KEK_FILE": "", "WMTRACE_KEK": ""})
    assert r.returncode == 2 and "no key-encryption key" in r.stderr and "Traceback" not in r.stderr


def test_concurrent_issuing_processes_and_a_killed_one(pg_url, kek, tmp_path, master_file):
    """4 processes x 5 buyers at once, one killed (SIGKILL) after writing its first copy: after its lease
    (3 s here) its IDs are taken over by the next run; no hole, no duplicate, every copy names its buyer."""
    env = {"WMTRACE_STORAGE": str(tmp_path / "storage"), "WMTRACE_LEASE_SECONDS": "3"}
    assert wmtrace(*INIT, "--weights", master_file, registry=pg_url, env=env).returncode == 0
    issue = ["issue", "--buyers", "5", "--eval-samples", "0"]
    procs = [wmtrace(*issue, "--out", tmp_path / f"o{i}", registry=pg_url, wait=False,
                     env=env | ({"WMTRACE_FAILPOINT": "issue:written"} if i == 0 else {})) for i in range(4)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [-signal.SIGKILL, 0, 0, 0], results
    with registry.open(pg_url) as reg:
        # The killed run's 5 IDs wait for the next run; or, on a loaded machine, a run that reached `reserve`
        # over a lease after the kill has taken them over already (as it should): nothing reserved is left.
        assert len(reg.buyers()) == 15 and len(reg.buyers(status="reserved")) in (0, 5)
    time.sleep(3.5)
    r = wmtrace(*issue, "--out", tmp_path / "o4", registry=pg_url, env=env)
    assert r.returncode == 0, r.stderr
    _every_copy_traces(pg_url, 20)


def test_migrate_sqlite_to_postgres_and_back(workdir, pg_url, kek, tmp_path, issued):
    """The conftest registry (3 buyers) copied to PostgreSQL and back to a folder, verified both ways; a copy
    issued from the SQLite registry names its buyer against the migrated database. The evidence travels: the
    same seller key, the chain row for row (still verifying, the "migrate" entries appended to it), the
    statements, the receipts and a buyer's acknowledgement."""
    src = str(workdir / "registry")
    with registry.open(src) as s:
        ids = [b.id for b in s.buyers("small")]
        receipts = s.receipts("small", ids)
        s.record_ack(statement.acknowledge(receipts[ids[0]], SigningKey.generate()))
        chain, public, stated = s.audit_chain(), s.public_key().raw, s.statements()
    assert stated and len(receipts) == 3
    url, shown = _with_password(pg_url)
    r = wmtrace("registry", "migrate", "--to", url, "--storage", tmp_path / "storage", registry=src)
    assert r.returncode == 0 and shown in r.stdout and "3 issued" in r.stdout, r.stderr
    assert wmtrace("registry", "migrate", "--to", url, registry=src).returncode == 2  # not empty any more
    with registry.open(src) as s, registry.open(pg_url) as p:
        assert [b.public() for b in p.buyers()] == [b.public() for b in s.buyers()]
        assert p.key("small") == s.key("small")
        _same_evidence(p, chain, public, stated, receipts)
        assert p.ack("small", ids[0]) == s.ack("small", ids[0]) is not None
        b = s.buyers()[2]
        assert api.trace(b.file, p).buyer == {"id": b.id, "name": b.name}
        back = api.migrate_registry(p, tmp_path / "back")
    assert back["buyers"] == 3 and back["masters"][0]["key_fingerprint"] == keys.fingerprint(keys.read(
        workdir / "registry" / "keys" / "small.key"))
    assert back["seller"] == PublicKey(public).fingerprint and back["statements"] == len(stated)
    with registry.open(tmp_path / "back") as again:
        assert [b.public() for b in again.buyers()] == [b.public() for b in issued[1]]
        assert api.trace(b.file, again).buyer == {"id": b.id, "name": b.name}
        _same_evidence(again, chain, public, stated, receipts)
        assert [e["action"] for e in again.audit_chain()[len(chain):]] == ["migrate", "trace", "migrate", "trace"]


def _same_evidence(reg, chain: list[dict], public: bytes, stated: list[dict], receipts: dict) -> None:
    check = reg.verify_chain()
    assert check["ok"], check["problems"][:3]
    assert reg.audit_chain()[:len(chain)] == chain and reg.public_key().raw == public
    assert reg.statements() == stated and reg.receipts("small", list(receipts)) == receipts


def test_backup_and_restore_point_to_migrate(reg, tmp_path):
    with pytest.raises(BadInput, match="pg_dump"):
        api.backup(reg, tmp_path / "b")
    with pytest.raises(BadInput, match="registry migrate"):
        api.restore(tmp_path / "b", reg.url)


def test_a_late_release_does_not_drop_a_reservation_taken_over(reg, pg_url, monkeypatch):
    """A process whose lease ran out (heartbeat stalled) and that then gives up releases nothing of what
    another process took over."""
    _master(reg)
    monkeypatch.setenv("WMTRACE_LEASE_SECONDS", "1")
    with registry.open(pg_url) as slow, registry.open(pg_url) as other:
        ids = [b.id for b in slow.reserve("m", [None, None])]
        slow._heartbeat.stop()
        time.sleep(1.5)
        assert [b.id for b in other.reserve("m", [None, None])] == ids
        slow.release("m", ids)
        assert [b.id for b in other.buyers("m", status="reserved")] == ids
