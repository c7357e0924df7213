import gzip

import numpy as np
import pytest

from wmtrace.data import fashion_mnist_dir, load_fashion_mnist, read_idx
from wmtrace.errors import BadInput


def idx_bytes(a: np.ndarray) -> bytes:
    header = b"\x00\x00\x08" + bytes([a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    return header + a.astype(np.uint8).tobytes()


def test_idx_round_trip_plain_and_gz(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(a))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(a)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)


def test_idx_truncated_or_bad_magic(tmp_path):
    data = idx_bytes(np.zeros((5, 5), np.uint8))
    (tmp_path / "t").write_bytes(data[:-3])
    with pytest.raises(BadInput, match="header promises"):
        read_idx(tmp_path / "t")
    (tmp_path / "m").write_bytes(b"\x01\x02" + data[2:])
    with pytest.raises(BadInput, match="magic"):
        read_idx(tmp_path / "m")


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WMTRACE_DATA", str(tmp_path))
    with pytest.raises(BadInput, match="dataset-fashion-mnist"):
        fashion_mnist_dir()


def test_real_fashion_mnist():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert set(y.tolist()) == set(range(10))
    assert abs(float(x.mean())) < 0.05  # normalised
    xt, _ = load_fashion_mnist("train", limit=100)
    assert xt.shape == (100, 1, 28, 28)
