"""The evidence layer alone (no model, no registry): Merkle proofs, the audit hash chain's `check`,
statements, receipts and acknowledgements, RFC 3161 requests, and the signing key's secrecy."""

import hashlib
import re
import shutil
import subprocess

import pytest

from wmtrace.evidence import chain, merkle, statement, timestamp
from wmtrace.evidence.signing import SigningKey, canonical

SELLER = SigningKey(bytes(range(32)))
OTHER = SigningKey(bytes(range(1, 33)))


def _leaves(n: int, master: str = "m") -> list[dict]:
    return [statement.leaf(master, i, f"buyer-{i:04d}", hashlib.sha256(f"{master}{i}".encode()).hexdigest(),
                           "ab" * 32) for i in range(1, n + 1)]


def _tree(leaves: list[dict]) -> list[list[bytes]]:
    return merkle.levels([merkle.leaf_hash(x) for x in leaves])


# Merkle ---------------------------------------------------------------------------------------------
def test_every_proof_of_trees_of_1_to_40_leaves_verifies_and_any_change_fails():
    for n in range(1, 41):
        leaves = _leaves(n)
        tree = _tree(leaves)
        root = tree[-1][0].hex()
        assert len(tree[0]) == n
        for i, x in enumerate(leaves):
            steps = merkle.proof(tree, i)
            assert merkle.verify(x, steps, root), (n, i)
            assert len(steps) <= max(0, (n - 1).bit_length())
            assert not merkle.verify(x | {"sha256": "00" * 32}, steps, root)  # a changed leaf
            assert not merkle.verify(x, steps, "00" * 32)  # another root
            for k, (side, sibling) in enumerate(steps):
                changed = [list(s) for s in steps]
                changed[k][1] = ("00" if sibling[:2] != "00" else "11") + sibling[2:]
                assert not merkle.verify(x, changed, root), (n, i, k)  # a changed sibling
                flipped = [list(s) for s in steps]
                flipped[k][0] = "R" if side == "L" else "L"
                assert not merkle.verify(x, flipped, root), (n, i, k)  # a sibling on the wrong side
            if steps:
                assert not merkle.verify(x, steps[:-1], root)  # a step dropped
                assert not merkle.verify(x, [["X", steps[0][1]], *steps[1:]], root)  # no such side


def test_a_proof_of_one_tree_fails_against_another():
    a, b = _leaves(9, "a"), _leaves(9, "b")
    ta, tb = _tree(a), _tree(b)
    assert ta[-1][0] != tb[-1][0]
    for i in range(9):
        assert not merkle.verify(a[i], merkle.proof(ta, i), tb[-1][0].hex())
        assert not merkle.verify(b[i], merkle.proof(ta, i), ta[-1][0].hex())
    # the same buyers in another order (a buyer swapped) make another root: a receipt does not carry over
    swapped = [a[1], a[0], *a[2:]]
    assert _tree(swapped)[-1][0] != ta[-1][0]
    assert not merkle.verify(a[0], merkle.proof(ta, 0), _tree(swapped)[-1][0].hex())


def test_leaves_and_nodes_are_hashed_apart_so_a_node_never_passes_for_a_leaf():
    leaves = _leaves(4)
    tree = _tree(leaves)
    h0, h1 = tree[0][0], tree[0][1]
    node = tree[1][0]
    assert merkle.leaf_hash(leaves[0]) == hashlib.sha256(b"\x00" + canonical(leaves[0])).digest()
    assert node == hashlib.sha256(b"\x01" + h0 + h1).digest()
    # the second-preimage attack: the node's two children offered as one leaf's data hash to something else
    assert hashlib.sha256(b"\x00" + h0 + h1).digest() != node
    two = merkle.levels([hashlib.sha256(b"\x00" + h0 + h1).digest(), hashlib.sha256(b"\x00" + tree[0][2]
                                                                                     + tree[0][3]).digest()])
    assert two[-1][0] != tree[-1][0]
    # and no leaf document, proved from the node's level, reaches the root
    upper = merkle.proof(tree, 0)[1:]
    for fake in ({"node": node.hex()}, {"left": h0.hex(), "right": h1.hex()}):
        assert not merkle.verify(fake, upper, tree[-1][0].hex())


# The audit chain ------------------------------------------------------------------------------------
def _chain(n: int, key: SigningKey = SELLER, first_seq: int = 1, prev: str = chain.GENESIS) -> list[dict]:
    out = []
    for k in range(n):
        at, action, detail = 1_700_000_000.25 + k, "issue" if k else chain.START, {"id": k, "note": "x" * k}
        h, sig = chain.seal(key, prev, at, action, "m", detail)
        out.append({"seq": first_seq + k, "at": at, "action": action, "master": "m", "detail": detail,
                    "prev": prev, "hash": h, "sig": sig})
        prev = h
    return out


def _problems(entries: list[dict], first_prev: str | None = chain.GENESIS) -> list[str]:
    return [str(p) for p in chain.check(entries, SELLER.public, first_prev)]


def test_an_intact_chain_has_no_problem_and_renumbering_is_harmless():
    entries = _chain(10)
    assert _problems(entries) == []
    assert _problems([e | {"seq": e["seq"] + 100} for e in entries]) == []
    assert _problems(entries, None) == []


def test_an_edited_entry_is_named():
    entries = _chain(10)
    entries[4] = entries[4] | {"detail": {"id": 99, "note": "xxxx"}}
    (p,) = chain.check(entries, SELLER.public, chain.GENESIS)
    assert p.seq == 5 and "edited" in p.what
    entries = _chain(10)
    entries[6] = entries[6] | {"at": entries[6]["at"] + 1}  # backdated
    assert [(p.seq, "edited" in p.what) for p in chain.check(entries, SELLER.public, chain.GENESIS)] == [(7, True)]


def test_a_removed_entry_is_named_by_the_gap_it_leaves():
    entries = _chain(10)
    del entries[4]  # seq 5
    assert _problems(entries) == ["entry 6: 1 entry before it removed (after entry 4)"]
    del entries[4:6]  # seq 6, 7 too
    assert _problems(entries) == ["entry 8: 3 entries before it removed (after entry 4)"]
    assert _problems(_chain(10)[1:]) != []  # the first one removed: the second does not follow GENESIS


def test_swapped_entries_are_named_out_of_order():
    entries = _chain(10)
    entries[3], entries[4] = entries[4] | {"seq": 4}, entries[3] | {"seq": 5}
    problems = chain.check(entries, SELLER.public, chain.GENESIS)
    assert problems and all("out of order" in p.what for p in problems)
    assert {p.seq for p in problems} >= {4, 5}
    assert "entry 4: out of order: it follows entry 5, not entry 3" in [str(p) for p in problems]


def test_an_entry_signed_by_another_key_is_named():
    entries = _chain(10)
    e = entries[5]
    h, sig = chain.seal(OTHER, e["prev"], e["at"], e["action"], e["master"], e["detail"])
    assert h == e["hash"]
    entries[5] = e | {"sig": sig}
    assert _problems(entries) == ["entry 6: signature is not the seller's"]
    entries[5] = e | {"sig": None}
    assert _problems(entries) == ["entry 6: signature is not the seller's"]
    assert [p.seq for p in chain.check(_chain(10, OTHER), SELLER.public, chain.GENESIS)] == list(range(1, 11))


def test_a_segment_checks_from_its_first_entry():
    entries = _chain(20)
    segment = entries[7:15]
    assert _problems(segment, None) == []
    assert _problems(segment, entries[6]["hash"]) == []
    assert _problems(segment) != []  # as a whole chain it does not start at GENESIS
    segment[3] = segment[3] | {"detail": {}}
    assert [p.seq for p in chain.check(segment, SELLER.public, None)] == [11]


def test_a_malformed_entry_is_named_not_raised():
    entries = _chain(5)
    entries[2] = {k: v for k, v in entries[2].items() if k != "detail"}
    assert [p.seq for p in chain.check(entries, SELLER.public, chain.GENESIS)] == [3]


# Statements, receipts, acknowledgements ----------------------------------------------------------------
MASTER = {"name": "m", "weights_sha256": "cd" * 32, "key_commitment": "ef" * 32, "committed_at": 1.0,
          "committed_in": "01" * 32}


def _receipts(n: int = 7) -> tuple[dict, list[dict]]:
    leaves = _leaves(n)
    doc, tree = statement.build(SELLER, MASTER, leaves, 1, {"seq": 3, "hash": "02" * 32}, at=1_700_000_000.5)
    return doc, [statement.receipt(doc, tree, leaves, i, SELLER.public) for i in range(n)]


def test_receipts_verify_against_the_seller_key_only():
    doc, receipts = _receipts()
    assert doc["buyers"] == 7 and doc["ids"] == [1, 7] and doc["date"] == "2023-11-14T22:13:20+00:00"
    for r in receipts:
        assert statement.check_receipt(r, SELLER.public) == []
        assert statement.check_receipt(r, OTHER.public) == ["the statement's signature is not the seller's"]
    r = receipts[2]
    assert statement.check_receipt(r | {"leaf": receipts[3]["leaf"]}, SELLER.public) == [
        "the buyer's leaf is not in the statement's Merkle tree"]
    forged = r | {"statement": r["statement"] | {"buyers": 8}}
    assert statement.check_receipt(forged, SELLER.public) == ["the statement's signature is not the seller's"]
    assert statement.check_receipt({"type": "x"}, SELLER.public) == ["not a wmtrace receipt"]


def test_an_acknowledgement_verifies_for_its_buyer_and_receipt_only():
    _, receipts = _receipts()
    r = receipts[4]
    buyer, stranger = SigningKey.generate(), SigningKey.generate()
    ack = statement.acknowledge(r, buyer, at=1_700_000_100.0)
    assert statement.check_ack(ack, r) == []
    assert statement.check_ack(ack, r, buyer.public) == []
    assert statement.check_ack(ack, receipts[5], buyer.public) == ["it acknowledges another receipt"]
    altered = r | {"proof": [["L", "00" * 32], *r["proof"][1:]]}
    assert statement.check_ack(ack, altered, buyer.public) == ["it acknowledges another receipt"]
    assert statement.check_ack(ack, r, stranger.public) == ["signed by another key than the buyer's"]
    by_stranger = statement.acknowledge(r, stranger)
    assert statement.check_ack(by_stranger, r, buyer.public) == ["signed by another key than the buyer's"]
    # the buyer's key swapped in the document without re-signing
    assert "the buyer's signature does not verify" in statement.check_ack(
        ack | {"buyer_public_key": stranger.public.raw.hex()}, r, stranger.public)
    assert statement.check_ack(ack | {"buyer_public_key": "zz"}, r) == [
        "the acknowledgement carries no readable buyer key"]


def test_malformed_receipts_and_entries_give_problems_not_exceptions():
    doc, receipts = _receipts(3)
    r = receipts[0]
    for bad in (r | {"statement": [1]}, r | {"leaf": [1, 2]}, r | {"statement": doc | {"master": "m"}},
                r | {"proof": 7}, r | {"proof": [["L"]]}, r | {"leaf": None, "statement": None}):
        assert statement.check_receipt(bad, SELLER.public), bad
    ack = statement.acknowledge(r, OTHER)
    for bad in ([1], None, {"leaf": 1}):
        assert statement.check_ack(ack, bad)
    assert not SELLER.public.verify_document([1])
    entries = _chain(3)
    for bad in ([1], entries[1] | {"hash": [1]}, entries[1] | {"prev": [1]}, entries[1] | {"sig": {"a": 1}}):
        assert chain.check([entries[0], bad, entries[2]], SELLER.public, chain.GENESIS)


# RFC 3161 request, key secrecy ---------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_reads_the_timestamp_request_and_its_digest(tmp_path):
    doc, _ = _receipts(3)
    data = canonical(doc) + b"\n"
    for nonce in (None, 0, 127, 128, 2**63 + 5):
        f = tmp_path / "s.tsq"
        f.write_bytes(timestamp.request(data, nonce))
        out = subprocess.run(["openssl", "ts", "-query", "-in", str(f), "-text"], capture_output=True,
                             text=True, check=True).stdout
        assert "Hash Algorithm: sha256" in out and "Certificate required: yes" in out
        block = out.split("Message data:")[1].split("Policy")[0]
        digest = "".join(re.findall(r"\b[0-9a-f]{2}\b", " ".join(
            line.split(" - ", 1)[1][:48].replace("-", " ") for line in block.splitlines() if " - " in line)))
        assert digest == hashlib.sha256(data).hexdigest()
        if nonce is not None:
            assert re.search(r"Nonce: 0x([0-9A-F]+)", out).group(1) == f"{nonce:X}"


def test_a_signing_key_never_shows_its_seed():
    seed = bytes(range(200, 232))
    key = SigningKey(seed)
    for text in (repr(key), str(key), f"{key}", repr([key]), repr({"k": key})):
        assert seed.hex() not in text and seed.hex()[:16] not in text
        assert key.public.fingerprint in text
    assert key.seed == seed  # kept for storage
