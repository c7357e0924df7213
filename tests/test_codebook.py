"""The per-master codeword table (`coding.codebook`): equal to computing every codeword, stored 0600,
read back instead of recomputed, and never trusted when edited, foreign, truncated or unwritable."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from wmtrace.coding import codebook, codes, keys

SPEC = codes.CodeSpec()


@pytest.fixture(autouse=True)
def fresh_memo():
    """Each test starts as a new process would: nothing memoised."""
    codebook._memo.clear()
    yield
    codebook._memo.clear()


def _computed(key: bytes, master: str, ids) -> np.ndarray:
    return codes.codewords(key, master, ids, SPEC)


def _no_recompute(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("codewords were recomputed")

    monkeypatch.setattr(codes, "codewords", refuse)


def test_equals_computed_and_is_read_back_without_recomputing(tmp_path, monkeypatch):
    key, path = keys.generate(), tmp_path / "cache" / "m.codebook"
    ids = np.array([1, 7, 3, 250, 2])
    words = codebook.codewords(key, "m", ids, SPEC, path)
    assert np.array_equal(words, _computed(key, "m", ids))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    codebook._memo.clear()  # another process: the file, not the memo
    _no_recompute(monkeypatch)
    assert np.array_equal(codebook.codewords(key, "m", ids, SPEC, path), words)


def test_grows_when_a_larger_id_is_asked_for(tmp_path):
    key, path = keys.generate(), tmp_path / "m.codebook"
    codebook.codewords(key, "m", np.arange(1, 11), SPEC, path)
    small = path.stat().st_size
    ids = np.arange(1, 5001)
    assert np.array_equal(codebook.codewords(key, "m", ids, SPEC, path), _computed(key, "m", ids))
    assert path.stat().st_size > small
    codebook._memo.clear()
    assert np.array_equal(codebook.codewords(key, "m", ids[-3:], SPEC, path), _computed(key, "m", ids[-3:]))


@pytest.mark.parametrize("damage", ["edited row", "truncated", "other master", "other key", "garbage"])
def test_a_damaged_or_foreign_table_is_recomputed_never_used(tmp_path, damage):
    """An edited table could swap two buyers' codewords and frame one: it must fail its HMAC."""
    key, path = keys.generate(), tmp_path / "m.codebook"
    ids = np.arange(1, 301)
    codebook.codewords(key, "m", ids, SPEC, path)
    blob = bytearray(path.read_bytes())
    if damage == "edited row":  # buyer 5's row replaced by buyer 9's
        start = len(codebook.MAGIC) + 32 + codebook._HEAD.size  # rows follow the tag and the header
        row = SPEC.symbols
        blob[start + 5 * row:start + 6 * row] = blob[start + 9 * row:start + 10 * row]
        path.write_bytes(bytes(blob))
    elif damage == "truncated":
        path.write_bytes(bytes(blob[: len(blob) // 2]))
    elif damage == "other master":
        codebook._memo.clear()
        codebook.codewords(key, "other", ids, SPEC, tmp_path / "o.codebook")
        os.replace(tmp_path / "o.codebook", path)
    elif damage == "other key":
        codebook._memo.clear()
        codebook.codewords(keys.generate(), "m", ids, SPEC, tmp_path / "k.codebook")
        os.replace(tmp_path / "k.codebook", path)
    else:
        path.write_bytes(os.urandom(len(blob)))
    codebook._memo.clear()
    assert np.array_equal(codebook.codewords(key, "m", ids, SPEC, path), _computed(key, "m", ids))


def test_an_unwritable_cache_folder_costs_only_the_recomputation(tmp_path):
    key = keys.generate()
    target = tmp_path / "file-not-folder"
    target.write_text("x")
    ids = np.array([3, 1, 2])
    assert np.array_equal(codebook.codewords(key, "m", ids, SPEC, target / "m.codebook"), _computed(key, "m", ids))


def test_far_ids_are_computed_without_growing_the_table(tmp_path):
    key, path = keys.generate(), tmp_path / "m.codebook"
    far = np.array([1, 2 ** 31])
    assert np.array_equal(codebook.codewords(key, "m", far, SPEC, path), _computed(key, "m", far))
    assert not path.exists()
