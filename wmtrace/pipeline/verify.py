"""`verify`: check an evidence bundle with only the bundle, the leak and the seller's public key.

No registry is read. Every signature, Merkle proof and commitment is checked, then the extraction and
decoding are re-run from what the bundle reveals (one master's key and carriers) by the same code
`trace` runs. Each check is listed with what it found; the accusation stands only if every one passes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import formats, modelio
from ..coding import codes
from ..errors import BadInput
from ..evidence import chain, commit, merkle, seal, statement
from ..evidence.signing import PublicKey, document_hash
from ..registry import MasterConfig
from .evidence import BUNDLE, FORMAT, REVEAL, SEALED, leak_sha256
from .revealed import Revealed
from .trace import trace_tensors

SEALED_NOTE = "not checked: what reveals the key is sealed for arbiter"
MAX_JSON = 512 << 20  # a bundle's JSON files are read whole: a larger one is refused, not parsed


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Verification:
    bundle: str
    leak: str
    checks: list[Check] = field(default_factory=list)
    accused: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def verdict(self) -> str:
        """verified; incomplete (every check run passed, those needing a sealed key were not run); rejected."""
        if self.ok:
            return "verified"
        sealed = all(c.detail.startswith(SEALED_NOTE) for c in self.checks if not c.ok)
        return "incomplete" if sealed else "rejected"

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "bundle": self.bundle, "leak": self.leak,
                "accused": self.accused, "failed": self.failed, "checks": [asdict(c) for c in self.checks]}


class Rejected(Exception):
    """A check's failure, in words."""


def verify(bundle: str | os.PathLike, leak: str | os.PathLike, public_key: PublicKey,
           arbiter_key: bytes | None = None) -> Verification:
    """Every check of `bundle` for `leak` against the seller's `public_key`, in order; a check that cannot
    run (an earlier one left nothing to check) fails with the reason. A bundle sealed for an arbiter
    (`evidence --seal-to`) needs that arbiter's X25519 private key (`arbiter_key`) for the checks that use
    the revealed key; without it they are listed as not checked and the verdict is "incomplete"."""
    if not Path(bundle).is_dir():
        raise BadInput(f"{bundle}: no such bundle folder (written by 'wmtrace evidence')")
    if not Path(leak).exists():
        raise BadInput(f"{leak}: no such leaked file")
    b = _Bundle(Path(bundle), Path(leak), public_key, arbiter_key)
    v = Verification(str(bundle), str(leak))
    for name, step in b.steps():
        if name == "re-extraction" and v.failed:
            why = f"{SEALED_NOTE}: it needs the key" if v.verdict == "incomplete" else f"not run: {v.failed[0]} failed"
            v.checks.append(Check(name, False, why))
            continue
        try:
            detail = step()
            v.checks.append(Check(name, True, detail))
        except Rejected as e:
            v.checks.append(Check(name, False, str(e)))
        except Exception as e:  # noqa: BLE001 - a hostile bundle fails its check, never the verifier
            v.checks.append(Check(name, False, f"unreadable ({type(e).__name__}: {str(e)[:200]})"))
    v.accused = b.accused_names()
    return v


def _require(ok: bool, why: str) -> None:
    if not ok:
        raise Rejected(why)


class _Bundle:
    def __init__(self, root: Path, leak: Path, public: PublicKey, arbiter: bytes | None = None):
        self.root, self.leak, self.public, self.arbiter = root, leak, public, arbiter
        self._cache: dict[str, object] = {}

    def steps(self) -> Iterator[tuple[str, Callable[[], str]]]:
        yield from [("bundle files", self.files), ("seller key", self.seller_key), ("bundle signature", self.signed),
                    ("leak hash", self.leak_hash), ("audit chain", self.audit_chain), ("trace entry", self.trace_entry),
                    ("statements", self.statements), ("key commitment", self.key_commitment),
                    ("key committed before statement", self.key_before_statement), ("merkle proofs", self.proofs),
                    ("codeword commitments", self.codewords), ("issue entries", self.issue_entries),
                    ("buyer acknowledgements", self.acks), ("issued IDs", self.issued_ids),
                    ("re-extraction", self.reextract)]

    # Reading ----------------------------------------------------------------------------------
    def path(self, rel: str) -> Path:
        p = (self.root / rel).resolve()
        _require(rel and not os.path.isabs(rel) and p.is_relative_to(self.root.resolve()),
                 f"{rel!r}: a path outside the bundle")
        return p

    def json(self, rel: str):
        if rel not in self._cache:
            p = self.path(rel)
            _require(p.is_file(), f"{rel} is missing")
            _require(p.stat().st_size <= MAX_JSON, f"{rel} is larger than {MAX_JSON >> 20} MiB")
            try:
                self._cache[rel] = json.loads(p.read_bytes())
            except (ValueError, UnicodeDecodeError) as e:
                raise Rejected(f"{rel} is not JSON ({e})") from None
        return self._cache[rel]

    @property
    def manifest(self) -> dict:
        m = self.json(BUNDLE)
        _require(isinstance(m, dict) and m.get("type") == FORMAT, f"{BUNDLE} is not a wmtrace evidence bundle")
        return m

    @property
    def accused(self) -> list[int]:
        return [int(i) for i in self.manifest["accused"]]

    def receipt(self, i: int) -> dict:
        return self.json(f"receipts/{i}.json")

    @property
    def audit(self) -> list[dict]:
        entries = self.json("audit.json")
        _require(isinstance(entries, list) and entries, "audit.json holds no entries")
        return entries

    @property
    def reveal(self) -> dict:
        sealed_to = self.manifest.get("sealed_to")
        if not sealed_to:
            return self.json(REVEAL)
        if "reveal" not in self._cache:
            _require(self.arbiter is not None, f"{SEALED_NOTE} {sealed_to[:16]}: "
                     "pass the arbiter's key (--arbiter-key)")
            _require(seal.public_of(self.arbiter) == bytes.fromhex(sealed_to), "the bundle is sealed for another "
                     "arbiter key than the one given")
            p = self.path(SEALED)
            _require(p.is_file() and p.stat().st_size <= MAX_JSON, f"{SEALED} is missing")
            self._cache["reveal"] = json.loads(seal.unseal(self.arbiter, p.read_bytes()))
        return self._cache["reveal"]

    @property
    def key(self) -> bytes:
        return bytes.fromhex(self.reveal["key"])

    def names(self) -> dict[int, str]:
        """The accused buyers' names, from their receipts' leaves."""
        return {i: self.receipt(i)["leaf"]["name"] for i in self.accused}

    def accused_names(self) -> list[dict]:
        try:
            return [{"id": i, "name": name} for i, name in self.names().items()]
        except (Rejected, KeyError, TypeError, ValueError):
            return []

    def committing_entry(self) -> dict:
        return self.audit[0]

    # Checks, in order ----------------------------------------------------------------------------
    def files(self) -> str:
        files = self.manifest.get("files")
        _require(isinstance(files, dict) and files, f"{BUNDLE} lists no files")
        needed = {SEALED if self.manifest.get("sealed_to") else REVEAL, "audit.json", "seller.pub",
                  "carriers.safetensors", *(f"receipts/{i}.json" for i in self.accused)}
        missing = sorted(needed - set(files))
        _require(not missing, f"{BUNDLE} does not list {missing[0] if missing else ''}")
        for rel, digest in files.items():
            p = self.path(rel)
            _require(p.is_file(), f"{rel} is missing (a truncated bundle)")
            _require(modelio.sha256_file(p) == digest, f"{rel} differs from the file the bundle lists (sha256)")
        return f"{len(files)} files, each as listed"

    def seller_key(self) -> str:
        carried = PublicKey.from_pem(self.path("seller.pub").read_bytes(), "seller.pub")
        _require(carried.raw == self.public.raw, f"the bundle carries key {carried.fingerprint}, not the seller's "
                 f"{self.public.fingerprint}: a substituted key")
        _require(self.manifest.get("seller") == self.public.fingerprint,
                 f"{BUNDLE} names signer {self.manifest.get('seller')}, not {self.public.fingerprint}")
        return f"seller {self.public.fingerprint}, the key given"

    def signed(self) -> str:
        _require(self.public.verify_document(self.manifest), f"{BUNDLE}'s signature is not the seller's over its "
                 "content (edited after signing)")
        return "the manifest (leak, verdict, accused, files) is signed by the seller"

    def leak_hash(self) -> str:
        got, _ = leak_sha256(self.leak)
        want = self.manifest["leak"]["sha256"]
        _require(got == want, f"the leak's sha256 is {got[:16]}..., the bundle is for {want[:16]}... (another file)")
        return f"sha256 {got[:16]}... as stated"

    def audit_chain(self) -> str:
        problems = chain.check(self.audit, self.public)
        _require(not problems, str(problems[0]) if problems else "")
        return f"{len(self.audit)} entries (seq {self.audit[0]['seq']}-{self.audit[-1]['seq']}) linked and signed"

    def trace_entry(self) -> str:
        e, m = self.audit[-1], self.manifest
        _require(e["hash"] == m["trace_entry"] and e["action"] == "trace",
                 "the audit segment does not end at the trace the bundle points at")
        d = e["detail"]
        _require(d.get("sha256") == m["leak"]["sha256"], "the logged trace was of another file (sha256)")
        named = [d["buyer"]] if d.get("buyer") is not None else list(d.get("colluders") or [])
        _require(d.get("verdict") == m["verdict"] and named == self.accused and e["master"] == m["master"],
                 f"the logged trace found {d.get('verdict')} {named}, the bundle states {m['verdict']} {self.accused}")
        return f"entry {e['seq']}: {d['verdict']} {named}, logged {statement.date(e['at'])}"

    def statements(self) -> str:
        logged = {e["detail"].get("sha256") for e in self.audit if e["action"] == "statement"}
        numbers = []
        for i in self.accused:
            s = self.receipt(i)["statement"]
            _require(self.public.verify_document(s), f"statement {s.get('number')} (buyer {i}): the signature is "
                     "not the seller's")
            _require(s["master"]["name"] == self.manifest["master"], f"statement {s['number']} is of another master")
            _require(document_hash(s) in logged, f"statement {s['number']} is not in the audit log")
            head = {e["seq"]: e["hash"] for e in self.audit}.get(s["chain_head"]["seq"])
            _require(head in (None, s["chain_head"]["hash"]), f"statement {s['number']} pinned entry "
                     f"{s['chain_head']['seq']} as {s['chain_head']['hash'][:16]}...: the log was rewritten since")
            numbers.append(s["number"])
        return f"statement(s) {sorted(set(numbers))} signed and logged"

    def key_commitment(self) -> str:
        value = commit.key_commitment(self.key, bytes.fromhex(self.reveal["key_nonce"]))
        e = self.committing_entry()
        master = self.manifest["master"]
        logged = e["detail"].get("key_commitment") if e["action"] == "init" else \
            (e["detail"].get("masters") or {}).get(master) if e["action"] == chain.START else None
        _require(value == logged, f"the revealed key does not open the commitment in entry {e['seq']}")
        for i in self.accused:
            s = self.receipt(i)["statement"]["master"]
            _require(value == s["key_commitment"] and s["committed_in"] == e["hash"],
                     f"the revealed key does not open statement's commitment (buyer {i})")
        return f"the revealed key opens {value[:16]}..., committed in entry {e['seq']} ({e['action']})"

    def key_before_statement(self) -> str:
        e = self.committing_entry()
        for i in self.accused:
            s = self.receipt(i)["statement"]
            _require(e["at"] <= s["at"] and s["master"]["committed_at"] == e["at"],
                     f"the key was committed {statement.date(e['at'])}, after statement {s['number']} of "
                     f"{s['date']}: a key registered after the fact")
        return f"committed {statement.date(e['at'])}, before every statement"

    def proofs(self) -> str:
        for i in self.accused:
            r = self.receipt(i)
            leaf = r["leaf"]
            _require(leaf["id"] == i and leaf["master"] == self.manifest["master"],
                     f"receipt {i} holds the leaf of buyer {leaf.get('id')} of {leaf.get('master')!r}")
            _require(merkle.verify(leaf, r["proof"], r["statement"]["root"]),
                     f"buyer {i}'s leaf is not in statement {r['statement']['number']}'s tree")
        return f"{len(self.accused)} leaf/leaves in the signed tree(s)"

    def codewords(self) -> str:
        m = self.manifest["master"]
        spec = MasterConfig.from_json(self.reveal["config"], m).code
        for i in self.accused:
            word = np.packbits(codes.codeword(self.key, m, i, spec)).tobytes().hex()
            nonce = bytes.fromhex(self.reveal["codeword_nonces"][str(i)])
            _require(commit.codeword_commitment(word, nonce) == self.receipt(i)["leaf"]["codeword"],
                     f"buyer {i}'s codeword from the revealed key does not open the leaf's commitment")
        return "each accused buyer's codeword, derived from the revealed key, opens its leaf's commitment"

    def issue_entries(self) -> str:
        issued = {e["detail"].get("id"): e for e in self.audit if e["action"] == "issue"}
        found = []
        for i in self.accused:
            leaf = self.receipt(i)["leaf"]
            if i in issued:
                _require(issued[i]["detail"].get("sha256") == leaf["sha256"],
                         f"entry {issued[i]['seq']} logged buyer {i}'s copy with another sha256 than the receipt")
                found.append(f"buyer {i}: entry {issued[i]['seq']}")
            else:
                _require(self.committing_entry()["action"] == chain.START,
                         f"no issue entry for buyer {i} after the master's registration")
                found.append(f"buyer {i}: issued before the signed log began (in its first statement)")
        return "; ".join(found)

    def acks(self) -> str:
        said = []
        for i in self.accused:
            p = self.path(f"receipts/{i}.ack.json")
            if not p.exists():
                said.append(f"buyer {i}: none recorded")
                continue
            problems = statement.check_ack(self.json(f"receipts/{i}.ack.json"), self.receipt(i))
            _require(not problems, f"buyer {i}'s acknowledgement: {problems[0] if problems else ''}")
            key = PublicKey(bytes.fromhex(self.json(f"receipts/{i}.ack.json")["buyer_public_key"]))
            said.append(f"buyer {i}: acknowledged, signed by key {key.fingerprint}")
        return "; ".join(said)

    def issued_ids(self) -> str:
        """The bound counts the issued IDs: a list shorter than the log's statements would tighten it."""
        ids = {int(i) for i in self.reveal["issued_ids"]}
        stated = sum(int(e["detail"].get("buyers", 0)) for e in self.audit
                     if e["action"] == "statement" and e["master"] == self.manifest["master"])
        _require(len(ids) >= stated, f"{len(ids)} issued IDs revealed, but the log's statements cover {stated} "
                 "buyers: a shortened list would tighten the bound")
        _require(set(self.accused) <= ids, "an accused buyer is not among the revealed issued IDs")
        return f"{len(ids)} issued IDs, at least the {stated} buyers the log's statements cover"

    def reextract(self) -> str:
        m = self.manifest
        with tempfile.TemporaryDirectory(prefix="wmtrace-verify-") as cache:
            stored = self.path("stored.safetensors")
            revealed = Revealed(self.reveal, self.key, self.names(),
                                self.path("carriers.safetensors"), stored if stored.exists() else None, Path(cache))
            result = trace_tensors(formats.open_tensors(self.leak), revealed, str(self.leak), m["master"],
                                   float(m["max_false_positive"]))
        named = [result.buyer["id"]] if result.buyer else [c["id"] for c in result.colluders]
        _require(result.verdict == m["verdict"] and named == self.accused,
                 f"re-running the extraction gives {result.verdict} {named}, not {m['verdict']} {self.accused}")
        return (f"{result.verdict}: buyer(s) {named} named again from the revealed key, false-accusation bound "
                f"{result.false_positive_probability:.2g} (at most {m['max_false_positive']:g} asked)")

