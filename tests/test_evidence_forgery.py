"""`verify` accepts an honest evidence bundle and rejects each forgery, naming the check that fails.

The forger is the worst case for each row: where the seller could re-sign what it edits (the manifest,
a statement), the forgery is re-signed with the seller's key, so the row shows the check that catches
the lie itself and not merely a stale signature. The table's point is that nobody innocent is named by
a doctored bundle: every row must be rejected."""

import json
import shutil
from pathlib import Path

import pytest

from wmtrace import api
from wmtrace.coding import keys
from wmtrace.errors import BadInput
from wmtrace.evidence import commit
from wmtrace.evidence.signing import SigningKey, canonical, document_hash
from wmtrace.pipeline import verify as verify_mod
from wmtrace.pipeline.evidence import BUNDLE, write_document


@pytest.fixture(scope="module")
def honest(tmp_path_factory, issued):
    """A registry copy and an honest bundle for buyer 2's copy: (root, bundle, leak, seller key)."""
    src, _ = issued
    root = tmp_path_factory.mktemp("forgery")
    shutil.copytree(src, root, dirs_exist_ok=True, symlinks=True)
    leak = root / "out" / "buyer-0002.safetensors"
    with api.open_registry(root / "registry") as reg:
        api.evidence(reg, leak, root / "bundle")
        seller = reg.seller_key()
        (root / "seller.pem").write_text(reg.public_key().pem())
    return root, root / "bundle", leak, seller


def _doc(b: Path, rel: str):
    return json.loads((b / rel).read_text())


def _put(b: Path, rel: str, doc) -> None:
    (b / rel).write_text(json.dumps(doc) if isinstance(doc, list) else canonical(doc).decode())


def _resign(b: Path, key: SigningKey) -> None:
    """The forger's last step: the manifest's file list brought up to date and signed again with `key`."""
    m = _doc(b, BUNDLE)
    m["files"] = {rel: api.sha256_file(b / rel) if (b / rel).is_file() and ".." not in rel else digest
                  for rel, digest in m["files"].items()}
    write_document(b / BUNDLE, key.sign_document(m))


def _edit_entry(b, key):
    entries = _doc(b, "audit.json")
    issue = next(e for e in entries if e["action"] == "issue")
    issue["detail"]["name"] = "someone-else"
    _put(b, "audit.json", entries)
    _resign(b, key)


def _drop_entry(b, key):
    entries = _doc(b, "audit.json")
    del entries[len(entries) // 2]
    _put(b, "audit.json", entries)
    _resign(b, key)


def _reorder_entries(b, key):
    entries = _doc(b, "audit.json")
    entries[1], entries[2] = entries[2], entries[1]
    _put(b, "audit.json", entries)
    _resign(b, key)


def _statement_before_key(b, key):
    """The seller dates its statement before the key it reveals was committed (a key made after the fact)."""
    r = _doc(b, "receipts/2.json")
    s = {k: v for k, v in r["statement"].items() if k != "signature"}
    s["at"] = s["master"]["committed_at"] - 86400
    r["statement"] = key.sign_document(s)
    _put(b, "receipts/2.json", r)
    _resign(b, key)


def _swap_buyer(b, key):
    r = _doc(b, "receipts/2.json")
    r["leaf"]["name"] = "buyer-0003"
    _put(b, "receipts/2.json", r)
    _resign(b, key)


def _wrong_leak_hash(b, key):
    m = _doc(b, BUNDLE)
    m["leak"]["sha256"] = "ab" * 32
    _put(b, BUNDLE, m)
    _resign(b, key)


def _tamper_result(b, key):
    """The seller names buyer 3 instead of 2 and signs it: the log and the extraction disagree."""
    m = _doc(b, BUNDLE)
    m["accused"] = [3]
    m["result"]["buyer"] = {"id": 3, "name": "buyer-0003"}
    _put(b, BUNDLE, m)
    shutil.copy(b / "receipts" / "2.json", b / "receipts" / "3.json")
    m = _doc(b, BUNDLE)
    m["files"]["receipts/3.json"] = ""
    _put(b, BUNDLE, m)
    _resign(b, key)


def _tamper_result_unsigned(b, key):
    m = _doc(b, BUNDLE)
    m["verdict"] = "colluders"
    _put(b, BUNDLE, m)


def _forge_statement_signature(b, key):
    r = _doc(b, "receipts/2.json")
    sig = r["statement"]["signature"]["ed25519"]
    r["statement"]["signature"]["ed25519"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    _put(b, "receipts/2.json", r)
    _resign(b, key)


def _truncate(b, key):
    data = (b / "carriers.safetensors").read_bytes()
    (b / "carriers.safetensors").write_bytes(data[: len(data) // 2])


def _drop_file(b, key):
    (b / "reveal.json").unlink()


def _other_key(b, key):
    reveal = _doc(b, "reveal.json")
    reveal["key"] = keys.generate().hex()
    _put(b, "reveal.json", reveal)
    _resign(b, key)


def _substitute_public_key(b, key):
    """Someone else's bundle: their key in seller.pub, the manifest signed by it."""
    impostor = SigningKey.generate()
    (b / "seller.pub").write_text(impostor.public.pem())
    _resign(b, impostor)


def _forge_ack(b, key):
    """An acknowledgement the buyer never signed: made with another key, then its carried key swapped in."""
    r = _doc(b, "receipts/2.json")
    from wmtrace.evidence import statement

    ack = statement.acknowledge(r, SigningKey.generate())
    ack["buyer_public_key"] = SigningKey.generate().public.raw.hex()
    write_document(b / "receipts" / "2.ack.json", ack)
    m = _doc(b, BUNDLE)
    m["files"]["receipts/2.ack.json"] = ""
    _put(b, BUNDLE, m)
    _resign(b, key)


def _wrong_codeword_nonce(b, key):
    reveal = _doc(b, "reveal.json")
    reveal["codeword_nonces"]["2"] = commit.nonce().hex()
    _put(b, "reveal.json", reveal)
    _resign(b, key)


def _path_outside(b, key):
    m = _doc(b, BUNDLE)
    m["files"]["../../etc/passwd"] = "00" * 32
    _put(b, BUNDLE, m)
    _resign(b, key)


def _statement_of_other_master(b, key):
    r = _doc(b, "receipts/2.json")
    s = {k: v for k, v in r["statement"].items() if k != "signature"}
    s["master"] = dict(s["master"], name="another")
    r["statement"] = key.sign_document(s)
    _put(b, "receipts/2.json", r)
    _resign(b, key)


def _fewer_issued_ids(b, key):
    """The seller hides most of its buyers from the arbiter: fewer candidates, a smaller bound."""
    reveal = _doc(b, "reveal.json")
    reveal["issued_ids"] = [2]
    _put(b, "reveal.json", reveal)
    _resign(b, key)


FORGERIES = [  # (name, forge, failing check)
    ("edited audit entry", _edit_entry, "audit chain"),
    ("dropped audit entry", _drop_entry, "audit chain"),
    ("reordered audit entries", _reorder_entries, "audit chain"),
    ("key registered after the statement's date", _statement_before_key, "key committed before statement"),
    ("buyer swapped in the Merkle tree", _swap_buyer, "merkle proofs"),
    ("wrong leak hash", _wrong_leak_hash, "leak hash"),
    ("tampered trace result, re-signed by the seller", _tamper_result, "trace entry"),
    ("tampered trace result, not re-signed", _tamper_result_unsigned, "bundle signature"),
    ("forged receipt (statement) signature", _forge_statement_signature, "statements"),
    ("truncated bundle: a file cut", _truncate, "bundle files"),
    ("truncated bundle: a file missing", _drop_file, "bundle files"),
    ("revealed key not matching its commitment", _other_key, "key commitment"),
    ("public key substituted", _substitute_public_key, "seller key"),
    ("forged buyer acknowledgement", _forge_ack, "buyer acknowledgements"),
    ("codeword nonce that does not open the leaf", _wrong_codeword_nonce, "codeword commitments"),
    ("a listed path outside the bundle", _path_outside, "bundle files"),
    ("statement of another master", _statement_of_other_master, "statements"),
    ("issued IDs shortened to tighten the bound", _fewer_issued_ids, "issued IDs"),
]


def test_the_honest_bundle_verifies(honest):
    root, bundle, leak, _ = honest
    v = api.verify(bundle, leak, root / "seller.pem")
    assert v.ok, v.to_dict()
    assert len(v.checks) >= 15 and v.accused == [{"id": 2, "name": "buyer-0002"}]


@pytest.mark.parametrize("name,forge,check", FORGERIES, ids=[f[0] for f in FORGERIES])
def test_each_forgery_is_rejected_and_named(honest, tmp_path, name, forge, check):
    root, bundle, leak, seller = honest
    forged = tmp_path / "bundle"
    shutil.copytree(bundle, forged)
    forge(forged, seller)
    v = api.verify(forged, leak, root / "seller.pem")
    assert not v.ok
    assert check in v.failed, (name, v.to_dict())
    # Named first, except where the forgery also broke an earlier check (a re-signed statement is no
    # longer the one the log recorded).
    assert v.failed[0] == check or (check, v.failed[0]) == ("key committed before statement", "statements")
    assert next(c for c in v.checks if c.name == "re-extraction").detail.startswith("not run")


def test_a_bundle_replayed_for_another_leak_is_rejected(honest):
    root, bundle, _, _ = honest
    other = root / "out" / "buyer-0003.safetensors"
    v = api.verify(bundle, other, root / "seller.pem")
    assert v.failed == ["leak hash", "re-extraction"]


def test_a_rewritten_log_is_caught_by_the_statement_that_pinned_it(honest, tmp_path):
    """The seller rewrites an entry before its statement and re-signs every entry after it: the chain alone
    passes, but the statement (already in the buyer's receipt) pinned the old head."""
    root, bundle, leak, seller = honest
    forged = tmp_path / "bundle"
    shutil.copytree(bundle, forged)
    entries = _doc(forged, "audit.json")
    from wmtrace.evidence import chain

    entries[1]["detail"]["name"] = "rewritten"
    prev = entries[0]["hash"]
    for e in entries[1:]:
        e["prev"] = prev
        e["hash"], e["sig"] = chain.seal(seller, prev, e["at"], e["action"], e["master"], e["detail"])
        prev = e["hash"]
    m = _doc(forged, BUNDLE)
    m["trace_entry"] = prev
    _put(forged, BUNDLE, m)
    _put(forged, "audit.json", entries)
    _resign(forged, seller)
    v = api.verify(forged, leak, root / "seller.pem")
    assert "audit chain" not in v.failed and "statements" in v.failed


def test_verify_needs_no_registry_and_reads_nothing_outside_the_bundle(honest, tmp_path, monkeypatch):
    root, bundle, leak, _ = honest
    monkeypatch.setenv("WMTRACE_REGISTRY", str(tmp_path / "no-registry-here"))
    monkeypatch.chdir(tmp_path)
    v = verify_mod.verify(bundle, leak, verify_mod.PublicKey.from_pem((root / "seller.pem").read_text()))
    assert v.ok
    assert not (tmp_path / "no-registry-here").exists() and not (tmp_path / "registry").exists()
    assert document_hash(_doc(bundle, BUNDLE))  # the manifest is a signed document


def test_a_master_whose_key_was_revealed_issues_no_new_copy_unless_told(honest, tmp_path):
    """The bundle's holder can strip this master's marks: new copies come from a new registration."""
    root, _, _, _ = honest
    with api.open_registry(root / "registry") as reg:
        assert reg.revealed("small")["accused"] == [2]
        before = len(reg.buyers("small"))
        with pytest.raises(BadInput, match="revealed in an evidence bundle"):
            api.issue(reg, buyers=1, out=tmp_path / "new")
        assert len(reg.buyers("small", status=None)) == before and not (tmp_path / "new").exists()
        assert [b.id for b in api.issue(reg, buyers=1, out=tmp_path / "new", allow_revealed=True)] == [before + 1]


def test_a_bundle_sealed_to_an_arbiter_reveals_the_key_to_that_arbiter_alone(honest, tmp_path):
    root, _, _, seller = honest
    leak = root / "out" / "buyer-0003.safetensors"
    api.new_arbiter_key(tmp_path / "arbiter.key")
    api.new_arbiter_key(tmp_path / "other.key")
    with api.open_registry(root / "registry") as reg:
        api.evidence(reg, leak, tmp_path / "sealed", seal_to=tmp_path / "arbiter.key.pub")
        key_hex = reg.key("small").hex().encode()
    bundle = tmp_path / "sealed"
    assert not (bundle / "reveal.json").exists()
    assert not any(key_hex in p.read_bytes() for p in bundle.rglob("*") if p.is_file())
    pem = root / "seller.pem"
    anyone = api.verify(bundle, leak, pem)  # signatures, proofs and dates: checkable by anyone
    assert anyone.verdict == "incomplete"
    assert anyone.failed == ["key commitment", "codeword commitments", "issued IDs", "re-extraction"]
    arbiter = api.verify(bundle, leak, pem, tmp_path / "arbiter.key")
    assert arbiter.ok and arbiter.accused == [{"id": 3, "name": "buyer-0003"}]
    wrong = api.verify(bundle, leak, pem, tmp_path / "other.key")
    assert wrong.verdict == "rejected" and "sealed for another arbiter" in wrong.checks[7].detail
    blob = bytearray((bundle / "reveal.sealed").read_bytes())
    blob[-1] ^= 1
    (bundle / "reveal.sealed").write_bytes(bytes(blob))
    _resign(bundle, seller)
    altered = api.verify(bundle, leak, pem, tmp_path / "arbiter.key")
    assert "key commitment" in altered.failed and "authentication failed" in altered.checks[7].detail


def test_a_bundle_for_merged_copies_names_the_colluders_and_verifies(crowd, tmp_path):
    """Several customers accused at once: each gets their receipt in the bundle, and the arbiter's re-run
    names the same set."""
    src, buyers = crowd
    root = tmp_path / "crowd"
    shutil.copytree(src, root, symlinks=True)
    copies = [b.file.replace(str(src), str(root)) for b in buyers[:3]]
    merged = tmp_path / "merged.safetensors"
    api.collude(copies, "average", merged)
    with api.open_registry(root / "registry") as reg:
        manifest = api.evidence(reg, merged, tmp_path / "bundle")
        (tmp_path / "seller.pem").write_text(reg.public_key().pem())
    assert manifest["verdict"] == "colluders" and set(manifest["accused"]) <= {b.id for b in buyers[:3]}
    assert manifest["accused"]
    v = api.verify(tmp_path / "bundle", merged, tmp_path / "seller.pem")
    assert v.ok, v.to_dict()
    assert sorted(a["id"] for a in v.accused) == sorted(manifest["accused"])
