import os
import stat

import numpy as np
import pytest

from wmtrace.coding import keys
from wmtrace.errors import BadInput


def test_key_file_is_0600_and_round_trips(tmp_path):
    k = keys.generate()
    p = tmp_path / "k" / "m.key"
    old = os.umask(0)
    try:
        keys.write(p, k)
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert keys.read(p) == k
    with pytest.raises(BadInput):
        keys.write(p, keys.generate())  # never overwritten
    assert keys.read(p) == k


def test_world_readable_or_corrupt_key_is_refused(tmp_path):
    p = tmp_path / "m.key"
    keys.write(p, keys.generate())
    p.chmod(0o644)
    with pytest.raises(BadInput, match="chmod 600"):
        keys.read(p)
    p.chmod(0o600)
    p.write_text("zz")
    with pytest.raises(BadInput, match="corrupt"):
        keys.read(p)


def test_projection_is_deterministic_standard_normal_and_key_dependent():
    k = b"\x07" * 32
    x = keys.projection(k, "a", 128, 576)
    assert np.array_equal(x, keys.projection(k, "a", 128, 576))
    assert abs(x.mean()) < 0.02 and abs(x.std() - 1) < 0.02
    assert not np.allclose(x, keys.projection(k, "b", 128, 576))
    assert not np.allclose(x, keys.projection(b"\x08" * 32, "a", 128, 576))
    # Fingerprints identify a key without revealing it.
    assert keys.fingerprint(k) != keys.fingerprint(b"\x08" * 32)
    assert k.hex() not in keys.fingerprint(k)
