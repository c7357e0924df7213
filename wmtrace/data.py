"""Fashion-MNIST from its IDX files, with our own small reader: no download, no extra dependency."""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import BadInput

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MEAN, STD = 0.2860, 0.3530
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (plain or .gz): 2 zero bytes, a dtype code, a rank, then big-endian dims."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise BadInput(f"{path}: cannot read IDX file ({e})") from e
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _DTYPES:
        raise BadInput(f"{path}: not an IDX file (bad magic number)")
    rank = raw[3]
    header = 4 + 4 * rank
    if len(raw) < header:
        raise BadInput(f"{path}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank)]
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise BadInput(f"{path}: IDX body has {len(raw) - header} bytes, header promises {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def fashion_mnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The argument, else $WMTRACE_DATA, else where Debian's dataset-fashion-mnist puts the files."""
    d = Path(data_dir or os.environ.get("WMTRACE_DATA") or DEFAULT_DIR)
    if not all(_find(d, name) for pair in FILES.values() for name in pair):
        raise BadInput(
            f"Fashion-MNIST not found in {d}: install Debian's dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist) or point --data / WMTRACE_DATA at a folder with the four IDX files"
        )
    return d


def _find(d: Path, name: str) -> Path | None:
    for candidate in (d / name, d / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=8)
def _cached_idx(path: Path) -> np.ndarray:
    """One decode per file and process: training, evaluation and fidelity checks all read the same files.
    The arrays are read-only views of the file bytes, so no caller can change the cached copy."""
    return read_idx(path)


def _arrays(d: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (_cached_idx(_find(d, n).resolve()) for n in FILES[split])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise BadInput(f"{d}: {split} images and labels do not match")
    return images, labels


def load_fashion_mnist(
    split: str, data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float32 images N x 1 x 28 x 28 and int64 labels; `limit` keeps the first N."""
    if split not in FILES:
        raise BadInput(f"unknown split {split!r} (use 'train' or 'test')")
    if limit is not None and limit < 1:
        raise BadInput(f"limit must be a positive number of images, not {limit}")
    images, labels = _arrays(fashion_mnist_dir(data_dir), split)
    images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).sub_(MEAN).div_(STD).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))
