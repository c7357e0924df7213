"""Safetensors written as a stream: the header from names, dtypes and shapes alone, then each
tensor's bytes chunk by chunk, so that a file can be produced (or hashed) from any byte source, a
master's file read range by range plus a patch, without the model in memory.

The layout is the one `safetensors.torch.save_file` writes (0.4-0.8, checked byte for byte by
tests/test_patches.py): tensors ordered by dtype (largest first, in `ORDER`) then by name, the
header's JSON compact with `__metadata__` first (keys sorted here), padded with spaces to a
multiple of 8. `save_safetensors` writes through this module, so every copy comes from one writer.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..errors import BadInput, CorruptFile, first_line

# Order of tensors in a file, as safetensors sorts them (its Dtype enum, descending).
ORDER = ("U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2",
         "I8", "U8", "BOOL")
TORCH = {"U64": torch.uint64, "I64": torch.int64, "F64": torch.float64, "C64": torch.complex64,
         "F32": torch.float32, "U32": torch.uint32, "I32": torch.int32, "BF16": torch.bfloat16,
         "F16": torch.float16, "U16": torch.uint16, "I16": torch.int16, "F8_E4M3": torch.float8_e4m3fn,
         "F8_E5M2": torch.float8_e5m2, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in TORCH.items()}
SIZES = {k: torch.empty(0, dtype=v).element_size() for k, v in TORCH.items()}
# 8 MiB: large enough that hashing and writing run at disk speed, small enough to stay out of the way.
CHUNK = 8 << 20


@dataclass(frozen=True)
class Entry:
    """One tensor as a file declares it."""

    name: str
    dtype: str  # safetensors' name: "F32", "BF16", ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * SIZES[self.dtype]

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> Entry:
        if t.dtype not in NAMES:
            raise BadInput(f"tensor {name!r}: dtype {t.dtype} cannot be written as safetensors")
        return cls(name, NAMES[t.dtype], tuple(t.shape))


def layout(entries: Iterable[Entry], metadata: dict[str, str] | None = None) -> tuple[bytes, list[Entry]]:
    """The file's first bytes (length and header) and the entries in the order their bytes follow."""
    ordered = sorted(entries, key=lambda e: (ORDER.index(e.dtype), e.name.encode()))
    head: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for e in ordered:
        head[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, ordered


def file_size(entries: Iterable[Entry], metadata: dict[str, str] | None = None) -> int:
    entries = list(entries)
    return len(layout(entries, metadata)[0]) + sum(e.nbytes for e in entries)


def tensor_chunks(t: torch.Tensor, chunk: int = CHUNK) -> Iterator[memoryview]:
    """A tensor's bytes in file order (C order, little-endian as stored on every platform we run on)."""
    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
    view = memoryview(raw)
    for start in range(0, len(view), chunk):
        yield view[start:start + chunk]


def chunks(entries: Iterable[Entry], read: Callable[[Entry], Iterable[bytes | memoryview | Range]],
           metadata: dict[str, str] | None = None) -> Iterator[bytes | memoryview | Range]:
    """A whole file's bytes: the header, then `read(entry)` for each entry in file order. Each entry's
    bytes are counted: a source that gives more or fewer than the header declares is a bug, refused."""
    header, ordered = layout(entries, metadata)
    yield header
    for e in ordered:
        n = 0
        for piece in read(e):
            n += len(piece)
            yield piece
        if n != e.nbytes:
            raise CorruptFile(f"tensor {e.name!r}: {n} bytes where {e.nbytes} were declared")


def tensors_chunks(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Iterator:
    """The bytes of a safetensors file holding `tensors`, never assembled in memory."""
    entries = [Entry.of(k, v) for k, v in tensors.items()]
    return chunks(entries, lambda e: tensor_chunks(tensors[e.name]), metadata)


def write_atomic(path: str | os.PathLike, pieces: Iterable[bytes | memoryview],
                 check: Callable[[str, int], None] | None = None, digest: bool = True) -> str | None:
    """Write `pieces` to `path` atomically (temporary file beside it, fsync, rename) and return the
    sha256 of what was written (None with `digest=False`). `check(sha256, size)` runs before the
    rename: raising there leaves no file. A full disk or an error from the source leaves the old
    file (if any) intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    h, size = hashlib.sha256() if digest or check else None, 0
    try:
        with open(tmp, "wb") as f:
            for piece in pieces:
                size += put(f, piece, h)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(h.hexdigest(), size)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise BadInput(f"{path}: cannot write ({e.strerror or first_line(e)})") from e
        raise
    return h.hexdigest() if h is not None else None


class Range:
    """A stretch of an open file, standing for its bytes: a writer to a file has the kernel copy it
    (`copy_file_range`, no trip through Python's memory), anything else reads it (`data`). On this
    2-core machine a 2.2 GB master written from a memory map took 22.8 s against 9.8 s for
    `shutil.copyfile`; copied by the kernel (and read once for the sha256), 17.5 s."""

    __slots__ = ("fd", "offset", "length")

    def __init__(self, fd: int, offset: int, length: int):
        self.fd, self.offset, self.length = fd, offset, length

    def __len__(self) -> int:
        return self.length

    def read(self) -> bytes:
        data = os.pread(self.fd, self.length, self.offset)
        if len(data) != self.length:
            raise CorruptFile(f"a file being read shrank ({len(data)} of {self.length} bytes at {self.offset})")
        return data


def data(piece: bytes | memoryview | Range) -> bytes | memoryview:
    """A piece's bytes in memory."""
    return piece.read() if isinstance(piece, Range) else piece


def put(f: BinaryIO, piece: bytes | memoryview | Range, h=None) -> int:
    """Write one piece to the open file `f` (and into the hash `h`, if given); returns its length."""
    if not isinstance(piece, Range):
        if h is not None:
            h.update(piece)
        f.write(piece)
        return len(piece)
    if h is not None:
        h.update(piece.read())
    f.flush()
    done = 0
    while done < piece.length:
        try:
            n = os.copy_file_range(piece.fd, f.fileno(), piece.length - done, piece.offset + done)
        except OSError as e:  # no kernel copy between these files: read and write instead
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = 0
        if n == 0:
            rest = Range(piece.fd, piece.offset + done, piece.length - done).read()
            f.write(rest)
            n = len(rest)
        done += n
    return piece.length


def shard_groups(entries: list[Entry], shards: int) -> list[list[Entry]]:
    """Entries split into at most `shards` consecutive groups of about equal bytes, in the given order
    (the split `save_sharded` makes, so that a copy's shards can be recomputed from its entries)."""
    sizes = np.array([e.nbytes for e in entries], dtype=np.int64)
    bounds = np.searchsorted(np.cumsum(sizes), np.arange(1, shards) * sizes.sum() / shards)
    return [[entries[j] for j in g] for g in np.split(np.arange(len(entries)), bounds) if len(g)]


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def index_json(files: list[tuple[str, list[Entry]]]) -> bytes:
    """A sharded folder's model.safetensors.index.json for (shard file name, its entries), as
    `save_sharded` writes it."""
    weight_map = {e.name: name for name, group in files for e in group}
    total = sum(e.nbytes for _, group in files for e in group)
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode()


class FileTensors:
    """A safetensors file read range by range: each tensor's bytes come from the file when asked for,
    never all at once. For the registry's own master files, whose sha256 is recorded; a hostile file
    goes through `formats.open_tensors` instead."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
            n = struct.unpack("<Q", self._file.read(8))[0]
            size = os.fstat(self._file.fileno()).st_size
            if n > min(size - 8, 100 << 20):
                raise ValueError("header length beyond the file")
            head = json.loads(self._file.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise CorruptFile(f"{self.path}: not a readable safetensors file ({first_line(e)})") from e
        self.metadata: dict[str, str] = head.pop("__metadata__", None) or {}
        self.base = 8 + n
        self.entries: dict[str, Entry] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        for k, v in head.items():
            e = Entry(k, v["dtype"], tuple(v["shape"]))
            begin, end = v["data_offsets"]
            if e.dtype not in TORCH or end - begin != e.nbytes or self.base + end > size:
                raise CorruptFile(f"{self.path}: tensor {k!r} does not match its declared dtype, shape or offsets")
            self.entries[k], self.offsets[k] = e, (self.base + begin, self.base + end)

    def raw(self, name: str, chunk: int = CHUNK) -> Iterator[Range]:
        """The tensor's bytes as stored, chunk by chunk, as ranges of the file (`Range`)."""
        begin, end = self.offsets[name]
        for start in range(begin, end, chunk):
            yield Range(self._file.fileno(), start, min(chunk, end - start))

    def converted(self, name: str, dtype: str, chunk: int = CHUNK) -> Iterator[memoryview | bytes]:
        """The tensor's bytes in `dtype` (torch's element-wise rounding, the same chunk by chunk as
        whole), or as stored when the dtypes agree."""
        src = self.entries[name].dtype
        if src == dtype:
            yield from self.raw(name, chunk)
            return
        step = max(1, chunk // SIZES[src]) * SIZES[src]
        for piece in self.raw(name, step):
            t = torch.frombuffer(bytearray(piece.read()), dtype=TORCH[src]) if len(piece) else \
                torch.empty(0, dtype=TORCH[src])
            yield t.to(TORCH[dtype]).view(torch.uint8).numpy().tobytes()

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor in memory (a copy, writable)."""
        e = self.entries[name]
        begin, end = self.offsets[name]
        data = bytearray(Range(self._file.fileno(), begin, end - begin).read())
        t = torch.frombuffer(data, dtype=TORCH[e.dtype]) if data else torch.empty(0, dtype=TORCH[e.dtype])
        return t.reshape(e.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FileTensors:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
