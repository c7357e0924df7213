"""What makes a registry's records evidence, the same for every backend: the seller's signing key, the
signed hash chain of the audit log, master key commitments, Merkle statements and receipts.

A backend mixes `Ledger` in and provides `MARK` (its SQL placeholder), `_write()` (a transaction),
`_rows`, `_chain_lock(c)` (serializes appends across processes) and the seller key's storage
(`_load_seller`, `_save_seller`). Every audit entry goes through `audit`, which links it to the chain's
last entry and signs it; the first one after an upgrade starts the chain and commits to what the
registry already held (earlier entries, master keys, issued buyers), and says so.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import AbstractContextManager

from ..errors import BadInput
from ..evidence import chain, commit, merkle, statement
from ..evidence.signing import PublicKey, SigningKey, canonical, document_hash, sha256_hex

log = logging.getLogger("wmtrace")
ENTRY_COLUMNS = "seq, at, action, master, detail, prev, hash, sig"
IMPORTED = ("master", "id", "name", "status", "codeword", "file", "sha256", "agreement", "accuracy", "margin", "cosine",
            "created", "statement", "ack")  # a buyer's columns copied by `registry migrate`


def _detail(text: str):
    """An entry's detail; text that is no longer JSON (a row edited by hand) is kept as it is, so that
    `verify_chain` names the entry instead of failing to read the log."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


class Ledger:
    MARK: str = "?"
    location: str

    # Provided by the backend (defined on its class, so they come before these in the MRO), with `_rows`
    # and `key` (the master's secret) from the rest of the backend.
    def _write(self) -> AbstractContextManager:
        raise NotImplementedError

    def _chain_lock(self, c) -> None:
        raise NotImplementedError

    def _load_seller(self) -> bytes | None:
        raise NotImplementedError

    def _save_seller(self, seed: bytes) -> None:
        raise NotImplementedError

    def _now(self, c) -> float:
        """An entry's time: this host's clock; a shared database's backend gives the server's, so that hosts
        with skewed clocks still date one registry's entries and statements in order."""
        return time.time()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", self.MARK)

    # The seller's key ---------------------------------------------------------------------------
    def seller_key(self) -> SigningKey:
        """The registry's signing key, created at first use (0600 file, or sealed in the database)."""
        if getattr(self, "_seller", None) is None:
            seed = self._load_seller()
            if seed is None:
                self._save_seller(SigningKey.generate().seed)  # never replaces one written meanwhile
                seed = self._load_seller()
            self._seller = SigningKey(seed)
        return self._seller

    def public_key(self) -> PublicKey:
        return self.seller_key().public

    # The chain ----------------------------------------------------------------------------------
    def audit(self, c, action: str, master: str | None, **detail) -> dict:
        """Append a signed entry linked to the last one (inside the caller's transaction `c`); returns
        it. The chain is started first when the registry has none (a new or upgraded registry)."""
        return self._append(c, self._tail(c), action, master, detail)

    def _tail(self, c) -> str:
        """The chain's last hash, under the chain's lock; the chain is started first if there is none."""
        self._chain_lock(c)
        # The last signed entry: an unsigned row after it (an older wmtrace writing to an upgraded registry)
        # is left out of the chain, and `verify_chain` names it, rather than a second chain being started.
        last = c.execute("SELECT hash FROM audit WHERE hash IS NOT NULL ORDER BY seq DESC LIMIT 1").fetchone()
        if last is not None:
            return last["hash"]
        legacy = c.execute("SELECT 1 FROM audit LIMIT 1").fetchone() is not None
        self._start_chain(c, legacy=legacy)  # may be followed by statements over issued buyers
        return c.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()["hash"]

    def log_event(self, action: str, master: str | None, **detail) -> dict:
        """One signed entry in its own transaction (e.g. "reveal": a master's key handed to an arbiter)."""
        with self._write() as c:
            return self.audit(c, action, master, **detail)

    def log_trace(self, file: str, verdict: str, master: str | None, buyer: int | None,
                  colluders: list[int] | None = None, sha256: str | None = None) -> dict:
        """One signed entry per trace; `sha256`: the leak's (an evidence bundle points at this entry)."""
        extra = ({"colluders": colluders} if colluders else {}) | ({"sha256": sha256} if sha256 else {})
        return self.log_event("trace", master, file=file, verdict=verdict, buyer=buyer, **extra)

    def log_query(self, target: str, reveal: str, queries: int, verdict: str, master: str | None,
                  buyer: int | None, colluders: list[int] | None = None) -> dict:
        """One signed entry per query session: the target (a URL without credentials, or a path), what it
        revealed, how many queries were answered, and the verdict."""
        extra = {"colluders": colluders} if colluders else {}
        return self.log_event("query", master, target=target, reveal=reveal, queries=queries, verdict=verdict,
                              buyer=buyer, **extra)

    def audit_log(self, limit: int = 100) -> list[dict]:
        """The last `limit` entries, newest first, without their links (`audit_chain` has them)."""
        rows = self._rows(self._sql("SELECT seq, at, action, master, detail FROM audit ORDER BY seq DESC LIMIT ?"),
                          (limit,))
        return [{"seq": r["seq"], "at": r["at"], "action": r["action"], "master": r["master"],
                 "detail": json.loads(r["detail"])} for r in rows]

    def _append(self, c, prev: str, action: str, master: str | None, detail: dict) -> dict:
        at = self._now(c)
        h, sig = chain.seal(self.seller_key(), prev, at, action, master, detail)
        c.execute(self._sql("INSERT INTO audit (at, action, master, detail, prev, hash, sig) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)"),
                  (at, action, master, json.dumps(detail, sort_keys=True), prev, h, sig))
        return {"at": at, "action": action, "master": master, "detail": detail, "prev": prev, "hash": h, "sig": sig}

    def _start_chain(self, c, legacy: bool) -> dict:
        """The first signed entry: the seller's public key, the hash of every earlier (unsigned) entry, and
        a commitment to each master's key; then a statement over each master's issued buyers."""
        earlier = [[r["seq"], r["at"], r["action"], r["master"], _detail(r["detail"])]
                   for r in c.execute("SELECT seq, at, action, master, detail FROM audit ORDER BY seq").fetchall()]
        masters = {}
        for r in c.execute("SELECT name, weights_sha256, key_commitment FROM masters ORDER BY name").fetchall():
            if r["key_commitment"] is None:
                self._commit_key(c, r["name"])
            masters[r["name"]] = self._commitment(c, r["name"])["key_commitment"]
        detail = {"public_key": self.public_key().raw.hex(), "earlier_entries": len(earlier),
                  "earlier_sha256": sha256_hex(canonical(earlier)), "masters": masters}
        entry = self._append(c, chain.GENESIS, chain.START, None, detail)
        c.execute(self._sql("UPDATE masters SET committed_at = ?, committed_in = ? WHERE committed_in IS NULL"),
                  (entry["at"], entry["hash"]))
        stated = [s for name in masters if (s := self._statement(c, name)) is not None]
        if legacy:
            log.warning("%s: started the signed audit log; committed to %d earlier entries, %d master key(s) and "
                        "%d issued buyer(s) as of now (they were not signed before)", self.location, len(earlier),
                        len(masters), sum(s["buyers"] for s in stated))
        return entry

    def _log_init(self, c, m) -> dict:
        """A master's registration: its key committed to, in the signed entry that records it."""
        value = self._commit_key(c, m.name)
        entry = self.audit(c, "init", m.name, factory=m.factory, weights_sha256=m.weights_sha256, key_commitment=value)
        c.execute(self._sql("UPDATE masters SET committed_at = ?, committed_in = ? WHERE name = ?"),
                  (entry["at"], entry["hash"], m.name))
        return entry

    def _commit_key(self, c, master: str) -> str:
        """Commit to a master's key (random nonce) on its row; the committing entry is set by the caller."""
        nonce = commit.nonce()
        value = commit.key_commitment(self.key(master), nonce)
        c.execute(self._sql("UPDATE masters SET key_commitment = ?, commit_nonce = ? WHERE name = ?"),
                  (value, nonce.hex(), master))
        return value

    def _commitment(self, c, master: str) -> dict:
        r = c.execute(self._sql("SELECT name, weights_sha256, key_commitment, committed_at, committed_in "
                                "FROM masters WHERE name = ?"), (master,)).fetchone()
        return {"name": r["name"], "weights_sha256": r["weights_sha256"], "key_commitment": r["key_commitment"],
                "committed_at": r["committed_at"], "committed_in": r["committed_in"]}

    def audit_chain(self, first: int | None = None, last: int | None = None) -> list[dict]:
        """Entries `first`..`last` (by seq, inclusive), oldest first, with their links and signatures."""
        rows = self._rows(self._sql(f"SELECT {ENTRY_COLUMNS} FROM audit WHERE seq >= ? AND seq <= ? ORDER BY seq"),
                          (first if first is not None else 0, last if last is not None else 2**62))
        return [{"seq": r["seq"], "at": r["at"], "action": r["action"], "master": r["master"],
                 "detail": _detail(r["detail"]), "prev": r["prev"], "hash": r["hash"], "sig": r["sig"]}
                for r in rows]

    def verify_chain(self, published: list[dict] = ()) -> dict:
        """The whole log checked against the seller's key: every problem by entry (`wmtrace audit verify`);
        and against statements `published` from it (their pinned heads: a log cut at its end shows here)."""
        entries = self.audit_chain()
        earlier = next((k for k, e in enumerate(entries) if e["hash"] is not None), len(entries))
        signed = entries[earlier:]
        if not signed:  # a registry from before the chain, not written to since: nothing to check, no key made
            return {"entries": len(entries), "signed": 0, "unsigned_before_chain": earlier, "head": None,
                    "seller": None, "statements": 0, "problems": [], "ok": False}
        problems = chain.check(signed, self.public_key(), chain.GENESIS)
        if signed[0]["action"] == chain.START:
            start = signed[0]["detail"]
            got = sha256_hex(canonical([[e["seq"], e["at"], e["action"], e["master"], e["detail"]]
                                        for e in entries[:earlier]]))
            if start.get("earlier_entries") != earlier or start.get("earlier_sha256") != got:
                problems.insert(0, chain.Problem(signed[0]["seq"], f"the {earlier} unsigned entries before the "
                                                 "chain differ from those it committed to"))
        problems += [p for doc in published for p in statement.check_pinned(doc, signed, self.public_key())]
        head = self._rows("SELECT MAX(number) AS n FROM statements")
        return {"entries": len(entries), "signed": len(signed), "unsigned_before_chain": earlier,
                "head": signed[-1]["hash"], "seller": self.public_key().fingerprint,
                "statements": (head[0]["n"] or 0) if head else 0, "problems": [str(p) for p in problems],
                "ok": not problems}

    # Statements and receipts ----------------------------------------------------------------------
    def make_statement(self, master: str) -> dict | None:
        """Sign a statement over the master's issued buyers not yet in one (None when there are none)."""
        with self._write() as c:
            self._tail(c)  # a registry without a chain starts one, which states every master's buyers
            return self._statement(c, master)

    def _statement(self, c, master: str) -> dict | None:
        rows = c.execute(self._sql("SELECT id, name, sha256, codeword FROM buyers WHERE master = ? AND "
                                   "status = 'issued' AND statement IS NULL ORDER BY id"), (master,)).fetchall()
        if not rows:
            return None
        leaves = self._leaves(master, rows)
        last = c.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        head = {"seq": last["seq"], "hash": last["hash"]}
        number = c.execute("SELECT COALESCE(MAX(number), 0) + 1 AS n FROM statements").fetchone()["n"]
        doc, _ = statement.build(self.seller_key(), self._commitment(c, master), leaves, number, head, self._now(c))
        c.execute(self._sql("INSERT INTO statements (number, master, at, root, buyers, body) "
                            "VALUES (?, ?, ?, ?, ?, ?)"),
                  (number, master, doc["at"], doc["root"], doc["buyers"], json.dumps(doc, sort_keys=True)))
        c.cursor().executemany(self._sql("UPDATE buyers SET statement = ? WHERE master = ? AND id = ?"),
                               [(number, master, r["id"]) for r in rows])
        self._append(c, head["hash"], "statement", master,
                     {"number": number, "root": doc["root"], "buyers": doc["buyers"], "sha256": document_hash(doc)})
        return doc

    def _leaves(self, master: str, rows: list) -> list[dict]:
        seller = self.seller_key()
        return [statement.leaf(master, r["id"], r["name"], r["sha256"], commit.codeword_commitment(
            r["codeword"] or "", seller.derive("codeword", f"{master}/{r['id']}"))) for r in rows]

    def statements(self, master: str | None = None) -> list[dict]:
        q = "SELECT body FROM statements" + (" WHERE master = ?" if master else "") + " ORDER BY number"
        return [json.loads(r["body"]) for r in self._rows(self._sql(q), (master,) if master else ())]

    def receipts(self, master: str, ids: list[int]) -> dict[int, dict]:
        """Each buyer's receipt (statement, leaf, Merkle proof), rebuilt from the statement's buyers; a
        buyer not in a statement yet has none (`make_statement` first)."""
        numbers: dict[int, list[int]] = {}
        wanted = set(ids)  # one read of the master's stated buyers, not a round trip each
        for r in self._rows(self._sql("SELECT id, statement FROM buyers WHERE master = ? AND statement IS NOT NULL"),
                            (master,)):
            if r["id"] in wanted:
                numbers.setdefault(r["statement"], []).append(r["id"])
        out = {}
        for number, wanted in numbers.items():
            body = self._rows(self._sql("SELECT body FROM statements WHERE number = ?"), (number,))[0]["body"]
            doc = json.loads(body)
            rows = self._rows(self._sql("SELECT id, name, sha256, codeword FROM buyers WHERE master = ? AND "
                                        "statement = ? ORDER BY id"), (master, number))
            leaves = self._leaves(master, rows)
            tree = merkle.levels([merkle.leaf_hash(x) for x in leaves])
            if tree[-1][0].hex() != doc["root"]:
                raise BadInput(f"registry {self.location}: the buyers of statement {number} no longer match its root")
            index = {x["id"]: k for k, x in enumerate(leaves)}
            for i in wanted:
                out[i] = statement.receipt(doc, tree, leaves, index[i], self.public_key())
        return out

    def codeword_nonce(self, master: str, buyer_id: int) -> bytes:
        """The nonce of a buyer's codeword commitment (revealed in an evidence bundle for that buyer only)."""
        return self.seller_key().derive("codeword", f"{master}/{buyer_id}")

    def record_ack(self, ack: dict) -> dict:
        """Keep a buyer's acknowledgement of their receipt, after checking it against that receipt."""
        leaf = ack.get("leaf") if isinstance(ack, dict) else None
        if not isinstance(leaf, dict) or not isinstance(leaf.get("id"), int):
            raise BadInput("not a wmtrace acknowledgement (no buyer leaf)")
        r = self.receipts(str(leaf.get("master")), [leaf["id"]]).get(leaf["id"])
        if r is None:
            raise BadInput(f"buyer {leaf['id']} of master {leaf.get('master')!r} has no receipt in this registry")
        problems = statement.check_ack(ack, r)
        if problems:
            raise BadInput(f"acknowledgement refused: {problems[0]}")
        with self._write() as c:
            c.execute(self._sql("UPDATE buyers SET ack = ? WHERE master = ? AND id = ?"),
                      (json.dumps(ack, sort_keys=True), leaf["master"], leaf["id"]))
            self.audit(c, "acknowledged", leaf["master"], id=leaf["id"], sha256=document_hash(ack))
        return r

    def ack(self, master: str, buyer_id: int) -> dict | None:
        r = self._rows(self._sql("SELECT ack FROM buyers WHERE master = ? AND id = ?"), (master, buyer_id))
        return json.loads(r[0]["ack"]) if r and r[0]["ack"] else None

    def revoke(self, master: str, buyer_id: int, reason: str) -> dict:
        """Record, in a signed entry, that a buyer's licence ends now (a refund, a breach). The copy stays
        theirs to account for: `trace` still names them, and says since when they were revoked."""
        b = self._rows(self._sql("SELECT name FROM buyers WHERE master = ? AND id = ? AND status = 'issued'"),
                       (master, buyer_id))
        if not b:
            raise BadInput(f"no issued buyer {buyer_id} of master {master!r}")
        if buyer_id in self.revocations(master):
            raise BadInput(f"buyer {b[0]['name']} (id {buyer_id}) of master {master!r} is already revoked")
        return self.log_event("revoke", master, id=buyer_id, name=b[0]["name"], reason=reason)

    def _logged(self, action: str, master: str) -> list[dict]:
        """The master's signed entries of one action, oldest first, as {seq, at, **detail} (the index on
        (action, master) finds them without reading the rest of the log)."""
        rows = self._rows(self._sql("SELECT seq, at, detail FROM audit WHERE action = ? AND master = ? "
                                    "AND hash IS NOT NULL ORDER BY seq"), (action, master))
        return [{"seq": r["seq"], "at": r["at"], **d} for r in rows if isinstance(d := _detail(r["detail"]), dict)]

    def revocations(self, master: str) -> dict[int, dict]:
        """Revoked buyers of a master, by ID: when and why (read from the signed log, their one record)."""
        return {e["id"]: {"at": e["at"], "reason": e.get("reason", "")} for e in self._logged("revoke", master)
                if "id" in e}

    def revealed(self, master: str) -> dict | None:
        """The last time an evidence bundle revealed the master's key (its "reveal" entry), or None."""
        return next(reversed(self._logged("reveal", master)), None)

    def commitment(self, master: str) -> dict:
        """A master's key commitment, its nonce (secret until revealed) and the entry that committed it."""
        r = self._rows(self._sql("SELECT key_commitment, commit_nonce, committed_at, committed_in FROM masters "
                                 "WHERE name = ?"), (master,))
        if not r or r[0]["key_commitment"] is None:
            raise BadInput(f"master {master!r} has no key commitment yet (any write to the registry makes one)")
        return dict(r[0])

    # Copying a registry (`registry migrate`) ------------------------------------------------------
    def has_seller_key(self) -> bool:
        return self._load_seller() is not None

    def adopt_seller(self, seed: bytes) -> None:
        """Take another registry's signing key, so the chain and statements copied from it stay verifiable
        and old evidence bundles still name this seller; refused when this registry signs with another."""
        if self._load_seller() is None:
            self._save_seller(seed)
        if self._load_seller() != seed:
            raise BadInput(f"registry {self.location} already has a seller key of its own; migrate into an empty "
                           "registry")
        self._seller = None

    def evidence_records(self) -> dict:
        """What `import_records` needs besides buyers and the audit rows: each master's key commitment (with
        its nonce), each buyer's statement and acknowledgement, and the statements, as stored."""
        masters = {r["name"]: dict(r) for r in self._rows(
            "SELECT name, key_commitment, commit_nonce, committed_at, committed_in FROM masters")}
        marks = {(r["master"], r["id"]): (r["statement"], r["ack"]) for r in self._rows(
            "SELECT master, id, statement, ack FROM buyers WHERE statement IS NOT NULL OR ack IS NOT NULL")}
        statements = [dict(r) for r in self._rows(
            "SELECT number, master, at, root, buyers, body FROM statements ORDER BY number")]
        return {"masters": masters, "marks": marks, "statements": statements}

    def _import(self, c, buyers: list, audit: list[dict], records: dict | None) -> None:
        """`import_records` in the caller's transaction `c`: buyers (with their statement and acknowledgement
        from `records`), audit rows as they are (seq, links and signatures: the chain verifies here as it did
        there), then masters' commitments and the statements. `executemany` pipelines the rows."""
        marks, now = (records or {}).get("marks", {}), time.time()
        rows = [(b.master, b.id, b.name, b.status, b.codeword, b.file, b.sha256, b.agreement, b.accuracy, b.margin,
                 b.cosine, now, *marks.get((b.master, b.id), (None, None))) for b in buyers]
        entries = [(e["seq"], e["at"], e["action"], e["master"], json.dumps(e["detail"], sort_keys=True),
                    e.get("prev"), e.get("hash"), e.get("sig")) for e in audit]
        cur = c.cursor()
        cur.executemany(self._sql(f"INSERT INTO buyers ({', '.join(IMPORTED)}) VALUES "
                                  f"({', '.join('?' * len(IMPORTED))})"), rows)
        cur.executemany(self._sql(f"INSERT INTO audit ({ENTRY_COLUMNS}) VALUES ({', '.join('?' * 8)})"), entries)
        if records:
            self._import_evidence(cur, records)

    def _import_evidence(self, cur, records: dict) -> None:
        """Masters' commitments and the statements copied in as they are (rows of `evidence_records`)."""
        cur.executemany(self._sql("UPDATE masters SET key_commitment = ?, commit_nonce = ?, committed_at = ?, "
                                  "committed_in = ? WHERE name = ?"),
                        [(r["key_commitment"], r["commit_nonce"], r["committed_at"], r["committed_in"], name)
                         for name, r in records["masters"].items()])
        cur.executemany(self._sql("INSERT INTO statements (number, master, at, root, buyers, body) "
                                  "VALUES (?, ?, ?, ?, ?, ?)"),
                        [(s["number"], s["master"], s["at"], s["root"], s["buyers"], s["body"])
                         for s in records["statements"]])
