"""What third-party evidence (issue #18) costs: `issue` with and without it, a statement over 100,000
buyers, the audit chain's signatures, and an evidence bundle.

    OMP_NUM_THREADS=1 python benchmarks/bench_evidence.py --trained CACHED_EXAMPLE.safetensors \\
        --out benchmarks/results/evidence.json

1. Issue, side by side in one process: the example master registered once, its registry copied, and copies
   issued into both in alternating batches (so a shared machine's load weighs on both alike): as shipped,
   and with the evidence switched off in-process (`pipeline.evidence.publish` a no-op, the registry's
   `audit` the plain unsigned INSERT it was before #18). The shipped batches also time the evidence pieces
   themselves (`chain.seal`, `make_statement`, `receipts`, `publish`). `--eval-samples` 0 makes `issue` as
   cheap as it gets, so evidence's share is the largest; `--default-eval-buyers` copies at the master's
   own setting (every held-out sample) give the share at the default.
2. Scale: `--buyers` issued rows added to a copy of that registry as `issue` records them (codeword, sha256),
   as bench_trace_scale does; then `make_statement` over all of them, a receipt for one (rebuilds the tree),
   `merkle.levels` alone, `--chain` signed entries appended and `verify_chain()` over the whole log. The same
   on PostgreSQL (`--postgres URL`, default $WMTRACE_TEST_PG, else a private cluster as tests/pg.py makes
   one; `--no-postgres` skips it): the registry migrated to a fresh database before its statement.
3. Per entry: Ed25519 sign and verify of an entry hash, the entry's sha256, `chain.seal`.
4. `api.evidence` (trace + bundle) and `api.verify` of one issued copy, and the bundle's size.
5. `publish` after one `issue` call of `--publish-batch` buyers: the statement and every receipt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]
from _common import example_master, run_info, write_json  # noqa: E402

from wmtrace import api  # noqa: E402
from wmtrace.coding import codes  # noqa: E402
from wmtrace.evidence import chain, merkle  # noqa: E402
from wmtrace.evidence.signing import SigningKey  # noqa: E402
from wmtrace.pipeline import evidence  # noqa: E402
from wmtrace.registry.ledger import Ledger  # noqa: E402

PIECES = ((chain, "seal"), (Ledger, "make_statement"), (Ledger, "receipts"), (evidence, "publish"))


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Timers:
    """Wall time spent inside wrapped callables, by label; `seal` is also split by whether it ran inside
    `publish` (the statement's own entry) or outside (each reserve/issue entry)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.in_publish = False

    @contextlib.contextmanager
    def wrapping(self, owner: object, attr: str, label: str) -> Iterator[None]:
        original = getattr(owner, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            outer = label == "publish"
            self.in_publish |= outer
            try:
                return original(*a, **k)
            finally:
                key = label + ("_outside_publish" if label == "seal" and not self.in_publish else "")
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
                self.calls[key] = self.calls.get(key, 0) + 1
                if outer:
                    self.in_publish = False

        setattr(owner, attr, timed)
        try:
            yield
        finally:
            setattr(owner, attr, original)


def plain_audit(self, c, action: str, master: str | None, **detail) -> None:
    """The audit entry as written before #18: one unsigned, unlinked row."""
    c.execute(self._sql("INSERT INTO audit (at, action, master, detail) VALUES (?, ?, ?, ?)"),
              (time.time(), action, master, json.dumps(detail, sort_keys=True)))


@contextlib.contextmanager
def evidence_off(reg) -> Iterator[None]:
    reg.audit = plain_audit.__get__(reg)  # this registry only; the shipped one keeps Ledger.audit
    original = evidence.publish
    evidence.publish = lambda *a, **k: None
    try:
        yield
    finally:
        evidence.publish = original
        del reg.audit


def side_by_side(on_root: Path, off_root: Path, out: Path, rounds: int, batch: int, eval_samples: int | None) -> dict:
    """`rounds` pairs of batches, shipped and switched off, alternating which goes first, after one untimed
    copy in each (the first `issue` in a process pays for imports and first model builds)."""
    timers = Timers()
    spent: dict[str, list[float]] = {"shipped": [], "off": []}
    with api.open_registry(on_root) as on, api.open_registry(off_root) as off:
        api.issue(on, buyers=1, out=out / "warm-up", eval_samples=eval_samples)  # the process's first-call costs
        with evidence_off(off):
            api.issue(off, buyers=1, out=out / "warm-up", eval_samples=eval_samples)
        for r in range(rounds):
            for mode in (("shipped", "off") if r % 2 == 0 else ("off", "shipped")):
                with contextlib.ExitStack() as stack:
                    if mode == "off":
                        stack.enter_context(evidence_off(off))
                    else:
                        for owner, attr in PIECES:
                            stack.enter_context(timers.wrapping(owner, attr, attr))
                    t0 = time.perf_counter()
                    done = api.issue(on if mode == "shipped" else off, buyers=batch, out=out / mode,
                                     eval_samples=eval_samples)
                    spent[mode].append(time.perf_counter() - t0)
                    assert len(done) == batch
        assert on.verify_chain()["ok"]
    n = rounds * batch
    per = {k: sum(v) / n for k, v in spent.items()}
    evidence_s = timers.seconds.get("publish", 0.0) + timers.seconds.get("seal_outside_publish", 0.0)
    pairs = [a / b for a, b in zip(spent["shipped"], spent["off"], strict=True)]
    return {
        "eval_samples": "master's setting (all)" if eval_samples is None else eval_samples,
        "buyers_per_mode": n, "batches_per_mode": rounds, "batch": batch,
        "shipped_s_per_buyer": round(per["shipped"], 3), "evidence_off_s_per_buyer": round(per["off"], 3),
        "ratio_shipped_to_off": round(per["shipped"] / per["off"], 4),
        "ratio_median_of_pairs": round(float(np.median(pairs)), 4),
        "batch_s": {k: [round(x, 2) for x in v] for k, v in spent.items()},
        "pieces_ms_per_buyer": {k: round(v / n * 1e3, 3) for k, v in sorted(timers.seconds.items())},
        "pieces_calls": dict(sorted(timers.calls.items())),
        "pieces_ms_per_call": {k: round(v / timers.calls[k] * 1e3, 3) for k, v in sorted(timers.seconds.items())},
        "evidence_ms_per_buyer": round(evidence_s / n * 1e3, 3),
        "evidence_share_of_shipped_issue": round(evidence_s / sum(spent["shipped"]), 5),
    }


def shipped_only(on_root: Path, out: Path, buyers: int) -> dict:
    """Issue at the master's own eval_samples (all), timing the evidence pieces only (no pair: too slow)."""
    timers = Timers()
    with api.open_registry(on_root) as on, contextlib.ExitStack() as stack:
        for owner, attr in PIECES:
            stack.enter_context(timers.wrapping(owner, attr, attr))
        t0 = time.perf_counter()
        api.issue(on, buyers=buyers, out=out / "default")
        spent = time.perf_counter() - t0
    evidence_s = timers.seconds.get("publish", 0.0) + timers.seconds.get("seal_outside_publish", 0.0)
    return {"eval_samples": "master's setting (all)", "buyers": buyers, "shipped_s_per_buyer": round(spent / buyers, 2),
            "evidence_ms_per_buyer": round(evidence_s / buyers * 1e3, 3),
            "evidence_share_of_shipped_issue": round(evidence_s / spent, 6)}


def fill(db: Path, master: str, key: bytes, spec: codes.CodeSpec, count: int) -> None:
    """`count` more issued buyer rows, as `issue` records them (codeword, sha256; no file), no statement yet."""
    conn = sqlite3.connect(db)
    (top,) = conn.execute("SELECT MAX(id) FROM buyers WHERE master = ?", (master,)).fetchone()
    ids = np.arange((top or 0) + 1, (top or 0) + count + 1)
    words = codes.codewords(key, master, ids, spec)
    now = time.time()
    rows = [(master, int(i), f"buyer-{i:06d}", "issued", w.tobytes().hex(), secrets.token_hex(32), now)
            for i, w in zip(ids, words, strict=True)]
    with conn:
        conn.executemany("INSERT INTO buyers (master, id, name, status, codeword, sha256, created) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.close()


def clock(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    value = fn()
    return round(time.perf_counter() - t0, 3), value


def at_scale(reg, master: str, entries: int) -> dict:
    """A statement over every unstated issued buyer, one receipt, the tree alone, a long chain verified."""
    s_statement, doc = clock(lambda: reg.make_statement(master))
    last = reg._rows(reg._sql("SELECT MAX(id) AS n FROM buyers WHERE master = ?"), (master,))[0]["n"]
    s_receipt, got = clock(lambda: reg.receipts(master, [last]))
    assert last in got
    rows = reg._rows(reg._sql("SELECT id, name, sha256, codeword FROM buyers WHERE master = ? AND statement = ? "
                              "ORDER BY id"), (master, doc["number"]))
    s_leaves, leaves = clock(lambda: reg._leaves(master, rows))
    s_hash, hashes = clock(lambda: [merkle.leaf_hash(x) for x in leaves])
    s_levels, tree = clock(lambda: merkle.levels(hashes))
    assert tree[-1][0].hex() == doc["root"]
    t0 = time.perf_counter()
    with reg._write() as c:
        for i in range(entries):
            reg.audit(c, "bench", master, i=i)
    s_append = time.perf_counter() - t0
    s_verify, v = clock(reg.verify_chain)
    assert v["ok"], v["problems"][:3]
    return {"statement_buyers": doc["buyers"], "make_statement_s": s_statement, "receipt_one_buyer_s": s_receipt,
            "leaves_s": s_leaves, "leaf_hashes_s": s_hash, "merkle_levels_s": s_levels,
            "appended_entries": entries, "append_us_per_entry": round(s_append / entries * 1e6, 1),
            "verify_chain_entries": v["entries"], "verify_chain_s": s_verify,
            "verify_us_per_entry": round(s_verify / v["entries"] * 1e6, 1)}


def per_entry(n: int) -> dict:
    """Microseconds per entry of what the chain does to each: hash, sign, seal, verify."""
    key = SigningKey.generate()
    detail = {"id": 123456, "name": "buyer-123456", "sha256": "ab" * 32, "file": "/srv/copies/buyer-123456.pt"}
    prev = "0" * 64
    hashes = [chain.entry_hash(prev, 1.7e9 + i, "issue", "fashion-cnn", detail) for i in range(n)]
    sigs = [key.sign(bytes.fromhex(h)) for h in hashes]
    us = {}
    for label, fn in (("entry_sha256", lambda i: chain.entry_hash(prev, 1.7e9 + i, "issue", "fashion-cnn", detail)),
                      ("ed25519_sign", lambda i: key.sign(bytes.fromhex(hashes[i]))),
                      ("ed25519_verify", lambda i: key.public.verify(sigs[i], bytes.fromhex(hashes[i]))),
                      ("seal", lambda i: chain.seal(key, prev, 1.7e9 + i, "issue", "fashion-cnn", detail))):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        us[f"{label}_us"] = round((time.perf_counter() - t0) / n * 1e6, 2)
    assert all(key.public.verify(s, bytes.fromhex(h)) for s, h in zip(sigs[:10], hashes[:10], strict=True))
    return {"entries": n, **us}


def bundle(on_root: Path, work: Path) -> dict:
    """`api.evidence` and `api.verify` of the first issued copy; the bundle's files and bytes."""
    with api.open_registry(on_root) as reg:
        b = next(b for b in reg.buyers() if b.status == "issued")
        s_evidence, _ = clock(lambda: api.evidence(reg, b.file, work / "bundle"))
        (work / "seller.pem").write_text(api.export_public_key(reg))
    s_verify, v = clock(lambda: api.verify(work / "bundle", b.file, work / "seller.pem"))
    assert v.ok, v.failed
    files = [p for p in (work / "bundle").rglob("*") if p.is_file()]
    return {"evidence_s": s_evidence, "verify_s": s_verify, "checks": len(v.checks), "files": len(files),
            "bundle_bytes": sum(p.stat().st_size for p in files),
            "by_file": {p.relative_to(work / "bundle").as_posix(): p.stat().st_size for p in sorted(files)}}


def on_postgres(server: str, root: Path, master: str, entries: int) -> dict:
    """`at_scale` on a fresh database holding `root` migrated (a KEK generated for the run)."""
    import psycopg

    from tests.pg import database_url

    os.environ["WMTRACE_KEK"] = secrets.token_hex(32)
    name = f"wmtrace_bench_{secrets.token_hex(4)}"
    with psycopg.connect(server, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    try:
        url = database_url(server, name)
        with api.open_registry(root) as src:
            s_migrate, _ = clock(lambda: api.migrate_registry(src, url, storage=str(root.parent / f"{name}-storage")))
        with api.open_registry(url) as reg:
            return {"migrate_s": s_migrate, **at_scale(reg, master, entries)}
    finally:
        with psycopg.connect(server, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def publish_batch(on_root: Path, work: Path, count: int) -> dict:
    """`publish` after one `issue` call of `count` buyers (rows added as `fill` adds them): the statement
    over them and every receipt written beside the copies."""
    root = work / "batch"
    shutil.copytree(on_root, root)
    with api.open_registry(root) as reg:
        m = reg.master(api.EXAMPLE_MASTER)
        fill(root / "wmtrace.db", m.name, reg.key(m.name), m.config.code, count)
        issued = [b for b in reg.buyers(m.name) if b.status == "issued" and b.file is None]
        (root / "out").mkdir()
        s_publish, doc = clock(lambda: evidence.publish(reg, m.name, issued, root / "out"))
    assert doc["buyers"] == count == len(list((root / "out").glob("*.receipt.json")))
    return {"buyers": count, "publish_s": s_publish, "publish_ms_per_buyer": round(s_publish / count * 1e3, 3)}


def scale(args: argparse.Namespace, on_root: Path, work: Path) -> dict:
    large = work / "large"
    shutil.copytree(on_root, large)
    with api.open_registry(large) as reg:
        m = reg.master(api.EXAMPLE_MASTER)
        key, spec = reg.key(m.name), m.config.code
    s_fill, _ = clock(lambda: fill(large / "wmtrace.db", m.name, key, spec, args.buyers))
    out = {"buyers_added": args.buyers, "fill_rows_s": s_fill}
    if args.postgres:  # migrated before SQLite's statement, so both state the same buyers
        out["postgresql"] = on_postgres(args.postgres, large, m.name, args.chain)
    with api.open_registry(large) as reg:
        out["sqlite"] = at_scale(reg, m.name, args.chain)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/evidence.json")
    ap.add_argument("--trained", type=Path, help="an already trained example master (skips training)")
    ap.add_argument("--registry", type=Path, help="copy this SQLite registry holding the example master instead")
    ap.add_argument("--rounds", type=int, default=12, help="batch pairs issued side by side")
    ap.add_argument("--batch", type=int, default=2, help="copies per batch")
    ap.add_argument("--eval-samples", type=int, default=0, help="held-out samples per copy in the side-by-side")
    ap.add_argument("--default-eval-buyers", type=int, default=2, help="copies issued at the master's eval_samples")
    ap.add_argument("--publish-batch", type=int, default=10_000, help="buyers of one issue call for `publish` alone")
    ap.add_argument("--buyers", type=int, default=100_000, help="issued buyers added for the statement at scale")
    ap.add_argument("--chain", type=int, default=100_000, help="signed entries appended before verify_chain")
    ap.add_argument("--entries", type=int, default=20_000, help="entries for the per-entry figures")
    ap.add_argument("--postgres", default=os.environ.get("WMTRACE_TEST_PG"),
                    help="server URL whose role may create databases; default $WMTRACE_TEST_PG, else a private cluster")
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()

    result = {"command": " ".join(sys.argv), **run_info(), "load_before": load()}
    with tempfile.TemporaryDirectory(prefix="wmtrace-bench-evidence-") as tmp:
        work, stop = Path(tmp), None
        on_root, off_root = work / "shipped", work / "off"
        if args.registry:  # a registry already holding the example master: its registration is not timed
            shutil.copytree(args.registry, on_root)
            s_register = None
        else:
            with api.open_registry(on_root, create=True) as reg:
                s_register, _ = clock(lambda: example_master(reg, args.trained))
        shutil.copytree(on_root, off_root)
        result["register_s"] = s_register
        result["per_entry"] = per_entry(args.entries)
        result["issue"] = side_by_side(on_root, off_root, work / "copies", args.rounds, args.batch, args.eval_samples)
        result["load_after_issue"] = load()
        if args.default_eval_buyers:
            result["issue_default_eval"] = shipped_only(on_root, work / "copies", args.default_eval_buyers)
        result["bundle"] = bundle(on_root, work)
        if args.publish_batch:
            result["publish_batch"] = publish_batch(on_root, work, args.publish_batch)
        if args.no_postgres:
            args.postgres = None
        elif not args.postgres:
            from tests.pg import _private_cluster

            pg = Path(tempfile.mkdtemp(prefix="wmtrace-bench-pg-"))  # its own: initdb runs as postgres when root
            pg.chmod(0o755)
            args.postgres, stop = _private_cluster(pg)
        try:
            result["scale"] = scale(args, on_root, work)
        finally:
            if stop:
                subprocess.run(stop, capture_output=True)
                shutil.rmtree(pg, ignore_errors=True)
        result["postgresql"] = "run (private cluster)" if stop else ("run" if args.postgres else "not run")
        result["load_after"] = load()
    write_json(args.out, result, newline=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
