"""`registry migrate` between folders, where the evidence decides what is copied: a registry from before
the signed chain is copied as it is (the destination starts the chain), and a destination that already
signs with a key of its own is refused rather than given a chain it did not sign."""

import logging
import sqlite3

import pytest

from wmtrace import api
from wmtrace.coding import keys
from wmtrace.errors import BadInput
from wmtrace.evidence.signing import SigningKey


def _unsign(root) -> int:
    """Make the registry at `root` one from before the chain: no seller key, no links, no commitments."""
    (root / "seller.key").unlink()
    with sqlite3.connect(root / "wmtrace.db") as c:
        c.execute("UPDATE audit SET prev = NULL, hash = NULL, sig = NULL")
        c.execute("UPDATE masters SET key_commitment = NULL, commit_nonce = NULL, committed_at = NULL, "
                  "committed_in = NULL")
        c.execute("UPDATE buyers SET statement = NULL, ack = NULL")
        c.execute("DELETE FROM statements")
        return c.execute("SELECT count(*) FROM audit").fetchone()[0]


def test_a_registry_from_before_the_chain_is_copied_as_it_is(workdir, tmp_path, caplog):
    src = workdir / "registry"
    earlier = _unsign(src)
    with api.open_registry(src) as s, caplog.at_level(logging.WARNING, logger="wmtrace"):
        info = api.migrate_registry(s, tmp_path / "to")
    assert info["seller"] is None and info["chain_head"] is None and info["buyers"] == 3
    assert not (src / "seller.key").exists(), "migrating must not write into the source"
    assert f"started the signed audit log; committed to {earlier} earlier entries" in caplog.text
    with api.open_registry(tmp_path / "to") as d:
        check = d.verify_chain()
        assert check["ok"] and check["unsigned_before_chain"] == earlier and check["statements"] == 1, check
        assert [e["action"] for e in d.audit_chain()[earlier:]] == ["chain-start", "statement", "migrate"]


def test_a_destination_signing_with_its_own_key_is_refused(workdir, tmp_path):
    with api.open_registry(tmp_path / "to", create=True) as d, d.lock():  # an empty registry with a key of its own
        keys.write(tmp_path / "to" / "seller.key", SigningKey.generate().seed)
    with api.open_registry(workdir / "registry") as s, pytest.raises(BadInput, match="seller key of its own"):
        api.migrate_registry(s, tmp_path / "to")
    with api.open_registry(tmp_path / "to") as d:  # refused before anything was copied
        assert d.masters() == [] and d.buyers(status=None) == [] and d.audit_log() == []
