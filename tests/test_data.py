import gzip

import numpy as np
import pytest

from wmtrace.data import FILES, fashion_mnist_dir, load_fashion_mnist, read_idx
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


def test_idx_wider_dtype_is_big_endian(tmp_path):
    a = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "w").write_bytes(b"\x00\x00\x0c\x01" + (3).to_bytes(4, "big") + a.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "w"), [1, -2, 70000])


def test_idx_truncated_or_bad_magic(tmp_path):
    data = idx_bytes(np.zeros((5, 5), np.uint8))
    (tmp_path / "t").write_bytes(data[:-3])
    with pytest.raises(BadInput, match="header promises") as e:
        read_idx(tmp_path / "t")
    assert str(tmp_path / "t") in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "h").write_bytes(data[:6])
    with pytest.raises(BadInput, match="truncated IDX header"):
        read_idx(tmp_path / "h")
    (tmp_path / "m").write_bytes(b"\x01\x02" + data[2:])
    with pytest.raises(BadInput, match="magic"):
        read_idx(tmp_path / "m")
    (tmp_path / "z.gz").write_bytes(gzip.compress(data)[:-10])
    with pytest.raises(BadInput, match="z.gz"):
        read_idx(tmp_path / "z.gz")


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WMTRACE_DATA", str(tmp_path))
    with pytest.raises(BadInput, match="dataset-fashion-mnist") as e:
        fashion_mnist_dir()
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BadInput, match="dataset-fashion-mnist"):
        load_fashion_mnist("test", data_dir=tmp_path / "nowhere")


def test_data_dir_from_env_with_and_without_gz(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split, n in (("train", 7), ("test", 3)):
        images, labels = FILES[split]
        (tmp_path / images).write_bytes(idx_bytes(rng.integers(0, 256, (n, 28, 28))))
        (tmp_path / f"{labels}.gz").write_bytes(gzip.compress(idx_bytes(np.arange(n) % 10)))
    monkeypatch.setenv("WMTRACE_DATA", str(tmp_path))
    assert fashion_mnist_dir() == tmp_path
    x, y = load_fashion_mnist("train")
    assert x.shape == (7, 1, 28, 28) and x.dtype.is_floating_point
    assert y.tolist() == list(range(7))
    x, y = load_fashion_mnist("test", limit=2)
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [0, 1]


def test_bad_split_or_limit():
    with pytest.raises(BadInput, match="split"):
        load_fashion_mnist("valid")
    with pytest.raises(BadInput, match="limit"):
        load_fashion_mnist("test", limit=0)


@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_real_fashion_mnist(split, n):
    x, y = load_fashion_mnist(split)
    assert x.shape == (n, 1, 28, 28) and x.dtype.is_floating_point
    assert y.shape == (n,) and str(y.dtype) == "torch.int64"
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert set(y.tolist()) == set(range(10))
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05  # normalised
    xl, yl = load_fashion_mnist(split, limit=100)
    assert xl.shape == (100, 1, 28, 28) and yl.tolist() == y[:100].tolist()
