"""The signed audit log of a SQLite registry: statements and receipts after `issue`, tampering with the
database file named by entry, an old registry upgraded (the chain started once, on its first write), and
two processes appending at once."""

import json
import logging
import multiprocessing
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from wmtrace import api
from wmtrace.errors import BadInput
from wmtrace.evidence import chain, commit, statement
from wmtrace.evidence.signing import SigningKey, canonical, sha256_hex

OLD = Path(__file__).parent / "data" / "registry-0.1.0" / "registry"


@contextmanager
def _db(root: Path) -> Iterator[sqlite3.Connection]:
    """The database file opened directly, as someone editing it behind wmtrace's back would."""
    db = sqlite3.connect(root / "wmtrace.db", isolation_level=None)
    try:
        yield db
    finally:
        db.close()


def _problems(root: Path) -> list[str]:
    with api.open_registry(root) as reg:
        v = reg.verify_chain()
    assert v["ok"] is (not v["problems"])
    return v["problems"]


def _issue_seq(root: Path, buyer_id: int) -> int:
    """The seq of the signed entry that recorded a buyer's issue (a middle entry of the chain)."""
    with api.open_registry(root) as reg:
        return next(e["seq"] for e in reg.audit_chain() if e["action"] == "issue" and e["detail"]["id"] == buyer_id)


def test_after_issue_the_chain_verifies_and_each_buyer_holds_a_receipt(workdir):
    root = workdir / "registry"
    with api.open_registry(root) as reg:
        v = reg.verify_chain()
        assert v["ok"] and v["problems"] == [] and v["unsigned_before_chain"] == 0 and v["statements"] == 1
        entries = reg.audit_chain()
        assert entries[0]["action"] == chain.START and entries[0]["prev"] == chain.GENESIS
        assert v["signed"] == len(entries) and v["head"] == entries[-1]["hash"]
        (doc,) = reg.statements("small")
        assert (doc["buyers"], doc["ids"], doc["number"]) == (3, [1, 3], 1)
        assert reg.public_key().verify_document(doc)
        init = next(e for e in entries if e["action"] == "init")
        c = reg.commitment("small")
        assert doc["master"]["key_commitment"] == c["key_commitment"] == init["detail"]["key_commitment"]
        assert c["committed_in"] == doc["master"]["committed_in"] == init["hash"]
        assert commit.opens(c["key_commitment"], "master-key", reg.key("small"), bytes.fromhex(c["commit_nonce"]))
        receipts = reg.receipts("small", [1, 2, 3])
        for b in reg.buyers("small"):
            r = receipts[b.id]
            assert statement.check_receipt(r, reg.public_key()) == []
            assert (r["leaf"]["id"], r["leaf"]["name"], r["leaf"]["sha256"]) == (b.id, b.name, b.sha256)
            assert Path(b.file).name == f"{b.name}.safetensors"  # the receipt is written beside the copy
            assert json.loads((workdir / "out" / f"{b.name}.receipt.json").read_text()) == r
        assert json.loads((workdir / "out" / "statement-1.json").read_bytes()) == doc
        assert (workdir / "out" / "statement-1.tsq").stat().st_size > 40
        seed = reg.seller_key().seed.hex()
    assert (root / "seller.key").stat().st_mode & 0o777 == 0o600
    for f in [*root.rglob("*"), *(workdir / "out").iterdir()]:
        if f.is_file() and f.name != "seller.key":
            assert seed.encode() not in f.read_bytes() and bytes.fromhex(seed) not in f.read_bytes(), f


def test_an_edited_detail_is_named(workdir):
    root = workdir / "registry"
    s = _issue_seq(root, 2)
    with _db(root) as db:
        db.execute("UPDATE audit SET detail = replace(detail, 'buyer-0002', 'buyer-0009') WHERE seq = ?", (s,))
    (p,) = _problems(root)
    assert p.startswith(f"entry {s}: edited")


def test_a_detail_that_is_no_longer_json_is_named_not_raised(workdir):
    root = workdir / "registry"
    s = _issue_seq(root, 3)
    with _db(root) as db:
        db.execute("UPDATE audit SET detail = '{\"id\": 3,' WHERE seq = ?", (s,))
    (p,) = _problems(root)
    assert p.startswith(f"entry {s}: edited")


def test_a_buyers_acknowledgement_is_recorded_in_the_chain_and_a_forged_one_refused(workdir):
    root = workdir / "registry"
    buyer = SigningKey.generate()
    with api.open_registry(root) as reg:
        r = reg.receipts("small", [2])[2]
        ack = statement.acknowledge(r, buyer)
        with pytest.raises(BadInput, match="acknowledgement refused: it acknowledges another receipt"):
            reg.record_ack(statement.acknowledge(r | {"proof": []}, buyer))  # signed, over an altered receipt
        with pytest.raises(BadInput, match="acknowledgement refused: the buyer's signature does not verify"):
            reg.record_ack(ack | {"at": ack["at"] + 1})
        assert reg.ack("small", 2) is None
        assert reg.record_ack(ack) == r and reg.ack("small", 2) == ack
        last = reg.audit_chain()[-1]
        assert (last["action"], last["detail"]["id"]) == ("acknowledged", 2)
        assert reg.verify_chain()["ok"]


def test_a_deleted_entry_is_named_by_its_gap(workdir):
    root = workdir / "registry"
    s = _issue_seq(root, 2)
    with _db(root) as db:
        db.execute("DELETE FROM audit WHERE seq = ?", (s,))
    assert _problems(root) == [f"entry {s + 1}: 1 entry before it removed (after entry {s - 1})"]


def test_swapped_entries_are_named_out_of_order(workdir):
    root = workdir / "registry"
    s = _issue_seq(root, 2)
    with _db(root) as db:
        db.execute("UPDATE audit SET seq = -1 WHERE seq = ?", (s,))
        db.execute("UPDATE audit SET seq = ? WHERE seq = ?", (s, s + 1))
        db.execute("UPDATE audit SET seq = ? WHERE seq = -1", (s + 1,))
    problems = _problems(root)
    assert problems and all("out of order" in p for p in problems)
    assert f"entry {s}: out of order: it follows entry {s + 1}, not entry {s - 1}" in problems
    assert any(p.startswith(f"entry {s + 1}: ") for p in problems)


def test_a_rehashed_entry_keeps_a_signature_that_no_longer_fits(workdir):
    root = workdir / "registry"
    s = _issue_seq(root, 2)
    with _db(root) as db:
        prev, at, action, master, detail = db.execute(
            "SELECT prev, at, action, master, detail FROM audit WHERE seq = ?", (s,)).fetchone()
        detail = json.loads(detail) | {"sha256": "00" * 32}
        h = chain.entry_hash(prev, at, action, master, detail)
        db.execute("UPDATE audit SET detail = ?, hash = ? WHERE seq = ?", (json.dumps(detail), h, s))
    problems = _problems(root)
    assert problems[0] == f"entry {s}: signature is not the seller's"
    assert problems[1].startswith(f"entry {s + 1}: ")  # its successor follows the hash that was there


def _old_registry(tmp_path: Path) -> Path:
    root = tmp_path / "registry"
    shutil.copytree(OLD, root)
    (root / "keys" / "small.key").chmod(0o600)  # git keeps no file modes; the key reader insists on 0600
    return root


def test_an_old_registry_starts_its_chain_on_the_first_write_and_says_so(tmp_path, caplog):
    root = _old_registry(tmp_path)
    caplog.set_level(logging.WARNING, logger="wmtrace")
    with api.open_registry(root) as reg:  # a listing writes nothing: no chain, no seller key
        assert [b.id for b in api.list_buyers(reg, "small")] == [1, 2]
    with _db(root) as db:
        assert db.execute("SELECT COUNT(*) FROM audit WHERE hash IS NOT NULL").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM statements").fetchone()[0] == 0
        earlier = [[r[0], r[1], r[2], r[3], json.loads(r[4])]
                   for r in db.execute("SELECT seq, at, action, master, detail FROM audit ORDER BY seq")]
    assert not (root / "seller.key").exists() and not caplog.records
    assert len(earlier) == 4

    with api.open_registry(root) as reg:
        (b,) = reg.reserve("small", ["late"])
        (warning,) = [r for r in caplog.records if r.name == "wmtrace"]
        assert warning.levelno == logging.WARNING and "started the signed audit log" in warning.getMessage()
        assert "4 earlier entries, 1 master key(s) and 2 issued buyer(s)" in warning.getMessage()
        entries = reg.audit_chain()
        assert [e["hash"] for e in entries[:4]] == [None] * 4
        start, stated, reserved = entries[4:]
        assert start["action"] == chain.START and start["prev"] == chain.GENESIS
        c = reg.commitment("small")
        assert start["detail"] == {"public_key": reg.public_key().raw.hex(), "earlier_entries": 4,
                                   "earlier_sha256": sha256_hex(canonical(earlier)),
                                   "masters": {"small": c["key_commitment"]}}
        assert c["committed_in"] == start["hash"]
        assert commit.opens(c["key_commitment"], "master-key", reg.key("small"), bytes.fromhex(c["commit_nonce"]))
        assert (stated["action"], stated["detail"]["buyers"], reserved["action"]) == ("statement", 2, "reserve")
        (doc,) = reg.statements("small")
        assert doc["ids"] == [1, 2] and doc["chain_head"] == {"seq": start["seq"], "hash": start["hash"]}
        for r in reg.receipts("small", [1, 2]).values():
            assert statement.check_receipt(r, reg.public_key()) == []
        v = reg.verify_chain()
        assert v["ok"] and (v["unsigned_before_chain"], v["signed"]) == (4, 3), v
        reg.release("small", [b.id])
        assert reg.verify_chain()["ok"]
    assert len([r for r in caplog.records if r.name == "wmtrace"]) == 1  # said once, not at every write

    with _db(root) as db:  # one of the earlier, unsigned entries edited after the chain committed to them
        db.execute("UPDATE audit SET detail = replace(detail, 'buyer-0002', 'buyer-0007') WHERE seq = 4")
    (p,) = _problems(root)
    assert p.startswith(f"entry {start['seq']}: the 4 unsigned entries before the chain differ")


def test_an_old_registry_traced_starts_its_chain(tmp_path, caplog):
    """The first write is a trace (what an operator runs first after upgrading to look into a leak)."""
    root = _old_registry(tmp_path)
    caplog.set_level(logging.WARNING, logger="wmtrace")
    with api.open_registry(root) as reg:
        r = api.trace(OLD.parent / "buyer-0002.safetensors", reg)
        assert r.buyer == {"id": 2, "name": "buyer-0002"}
        assert [e["action"] for e in reg.audit_chain()][4:] == [chain.START, "statement", "trace"]
        assert reg.verify_chain()["ok"]
    assert any("started the signed audit log" in r.getMessage() for r in caplog.records)


def _append(root: str, n: int, who: str, go) -> None:
    go.wait()
    with api.open_registry(root, create=True) as reg:
        for k in range(n):
            if k % 2:
                reg.log_trace(f"{who}-{k}.safetensors", "not-found", None, None)
            else:
                reg.log_event("note", None, who=who, k=k)
            time.sleep(0.005)  # lets the other process in: without it one often holds the lock throughout


def _race(root: Path, n: int) -> None:
    ctx = multiprocessing.get_context("fork")  # the children touch SQLite and keys only
    go = ctx.Event()
    procs = [ctx.Process(target=_append, args=(str(root), n, who, go)) for who in ("a", "b")]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]


def test_two_processes_appending_at_once_leave_one_chain(workdir):
    root = workdir / "registry"
    with api.open_registry(root) as reg:
        before = len(reg.audit_chain())
    _race(root, 50)
    with api.open_registry(root) as reg:
        entries = reg.audit_chain()
        v = reg.verify_chain()
    assert v["ok"] and v["problems"] == [] and len(entries) == before + 100
    mine = [(e["detail"].get("who") or e["detail"]["file"][0], e["detail"].get("k")) for e in entries[before:]]
    assert sorted(w for w, _ in mine) == ["a"] * 50 + ["b"] * 50
    assert [k for w, k in mine if w == "a" and k is not None] == list(range(0, 50, 2))  # each in its own order
    assert len({e["hash"] for e in entries}) == len(entries)


def test_two_processes_starting_a_new_registry_at_once_share_one_seller_key_and_chain(tmp_path):
    root = tmp_path / "fresh"
    _race(root, 10)
    with api.open_registry(root) as reg:
        v = reg.verify_chain()
        entries = reg.audit_chain()
    assert v["ok"] and [e["action"] for e in entries].count(chain.START) == 1 and len(entries) == 21


def test_a_log_cut_at_its_end_is_shown_by_the_statement_published_from_it(workdir):
    """Deleting the last entries leaves a chain that verifies on its own; the statement issue wrote (and a
    seller would have published) pinned a head that is no longer there."""
    root = workdir / "registry"
    published = workdir / "out" / "statement-1.json"
    with api.open_registry(root) as reg:
        api.trace(workdir / "out" / "buyer-0001.safetensors", reg)  # one more entry after the statement
        assert api.verify_audit(reg, [published])["ok"]
    with _db(root) as db:
        (seq,) = db.execute("SELECT seq FROM audit WHERE action = 'statement' ORDER BY seq LIMIT 1").fetchone()
        db.execute("DELETE FROM audit WHERE seq >= ?", (seq,))
    with api.open_registry(root) as reg:
        assert reg.verify_chain()["ok"]  # the chain alone cannot see a cut at its end
        info = api.verify_audit(reg, [published])
    assert not info["ok"] and any("statement 1: not in the log" in p for p in info["problems"])
