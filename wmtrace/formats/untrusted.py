"""Checks that run before a leaked file's bytes are trusted with memory or with an `open`.

A leaked model is untrusted input. Formats declare sizes (zip members, tensor dims, strides,
external data lengths) that readers allocate for before looking at the bytes; each check here
compares what a file declares with what it holds, so that memory follows the file's size on disk
and a fifo or device never blocks or streams forever. Every refusal is a one-line `BadInput`: a
`CorruptFile` where what a file declares does not fit what it holds.
"""

from __future__ import annotations

import math
import os
import stat
import zipfile
from pathlib import Path

import torch

from ..errors import BadInput, CorruptFile

# Bytes that external data may reference beyond twice what its files hold on disk (st_blocks). A
# sparse file reads back as zeros it never stored, so memory would follow its declared size, not
# the disk: a 0-byte-on-disk 3 GiB file took 6.6 GB to read. Twice the allocated size leaves room
# for filesystems that compress (float weights compress far less than 2:1); the slack covers small
# files and filesystems that report blocks coarsely.
SPARSE_SLACK = 64 << 20


def regular_file(path: Path, what: str = "") -> os.stat_result:
    """stat of `path` (symlinks followed) when it is a regular file; a fifo, socket or device is
    refused before anything opens it, since opening a fifo blocks until a writer comes."""
    label = f"{what} {path}" if what else str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise BadInput(f"{label}: no such file") from e
    except (OSError, ValueError) as e:  # permissions, loops of symlinks, NUL bytes
        raise BadInput(f"{label}: cannot read ({getattr(e, 'strerror', None) or e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"{label}: not a regular file")
    return st


def read_head(path: Path, n: int) -> bytes:
    """The first `n` bytes of a regular file; opened non-blocking and checked again after opening,
    so a file swapped for a fifo after `regular_file` cannot hang the reader."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadInput(f"{path}: not a regular file")
        return os.read(fd, n)
    finally:
        os.close(fd)


def inside(base: Path, location: str) -> bool:
    """Whether `location` names a file strictly inside `base`, after resolving `..` and symlinks."""
    if not location or os.path.isabs(location):
        return False
    try:
        root = os.path.realpath(base)
        target = os.path.realpath(base / location)
        return target != root and os.path.commonpath([target, root]) == root
    except (ValueError, OSError):  # NUL bytes, mixed drives
        return False


def model_files(path: Path, names: tuple[str, ...]) -> list[Path]:
    """The entries of a folder named like model files, each a regular file inside the folder.

    `names`: how model file names end. A leaked folder is untrusted like a file: a symlink is
    followed only when it resolves inside the folder, and one that leads outside is refused (a shard
    from elsewhere on the disk would be read as part of the model); a fifo, socket or device so
    named is refused without being opened (opening a fifo blocks). Entries not named like model
    files are ignored, never opened.
    """
    out = []
    for p in sorted(path.iterdir()):
        if not p.name.endswith(names):
            continue
        if not inside(path, p.name):
            raise BadInput(f"{p}: links outside the folder {path}")
        if os.path.isdir(p):
            continue
        regular_file(p)
        out.append(p)
    return out


# --- PyTorch checkpoints ---------------------------------------------------------------------------


def check_zip(path: Path, size: int) -> None:
    """Refuse a zip checkpoint whose members would take more memory than the file holds.

    torch.save writes every member stored (uncompressed) and torch.load reads each one whole, so a
    deflated member is a decompression bomb (1 MB of zip, 1 GiB of zeros: 1.3 GB of memory) and a
    member, or members together, declaring more bytes than the file has can only be overlapping or
    lying. Checked from the central directory with Python's zipfile, before torch reads anything.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise CorruptFile(f"{path}: corrupt or truncated checkpoint (not a readable zip archive)") from e
    total = 0
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED:
            raise CorruptFile(f"{path}: checkpoint member {m.filename!r} is compressed (torch.save stores members "
                           "uncompressed; refusing a possible decompression bomb)")
        if m.file_size > size or m.compress_size != m.file_size:
            raise CorruptFile(f"{path}: checkpoint member {m.filename!r} declares {m.file_size} bytes, "
                           f"more than the file's {size}")
        total += m.file_size
    if total > size:
        raise CorruptFile(f"{path}: checkpoint members declare {total} bytes in all, more than the file's {size}")


def tensors_in(obj: object, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a loaded checkpoint with its dotted name, nested dicts flattened (without
    recursion: a hostile pickle may nest thousands deep). Lists and tuples are not descended."""
    out = []
    stack = [(prefix, obj)]
    while stack:
        name, o = stack.pop()
        if isinstance(o, torch.Tensor):
            out.append((name, o))
        elif isinstance(o, dict):
            stack.extend((f"{name}.{k}" if name else str(k), v) for k, v in reversed(list(o.items())))
    return out


def check_strides(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Refuse tensors that show more elements than their storage holds.

    A stride of 0 lets a 2-byte storage pose as 2^29 float16 values (a 1.6 KB checkpoint took
    2.4 GB once converted); an honest state dict's tensors never exceed their storage.
    """
    for name, t in tensors:
        if t.layout != torch.strided:
            continue  # sparse and other layouts are not weights here: dropped by the reader
        try:
            nbytes = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError) as e:
            raise CorruptFile(f"{path}: tensor {name!r} has no readable storage") from e
        if t.numel() * t.element_size() > nbytes:
            raise CorruptFile(f"{path}: tensor {name!r} declares {t.numel()} elements over a storage of "
                           f"{nbytes} bytes (strides that repeat data)")


# --- ONNX ------------------------------------------------------------------------------------------


def _bits(data_type: int) -> int | None:
    """Bits per element as stored in raw data; None for types without a fixed width (strings)."""
    from onnx import TensorProto, helper

    packed = {getattr(TensorProto, n, -1): b for n, b in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4),
                                                           ("INT2", 2), ("UINT2", 2), ("FLOAT6E2M3", 6),
                                                           ("FLOAT6E3M2", 6))}
    if data_type in packed:
        return packed[data_type]
    if data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        return helper.tensor_dtype_to_np_dtype(data_type).itemsize * 8
    except (KeyError, ValueError, TypeError):
        return None


def _declared(t, path: Path) -> int:
    """Bytes a tensor's dims and data type call for."""
    dims = list(t.dims)
    if any(d < 0 for d in dims):
        raise CorruptFile(f"{path}: tensor {t.name!r} declares negative dims {dims}")
    bits = _bits(t.data_type)
    if bits is None:
        raise CorruptFile(f"{path}: tensor {t.name!r} has raw data of a type without a fixed size")
    return math.ceil(math.prod(dims) * bits / 8)


def check_onnx(model, base: Path, path: Path) -> None:
    """Refuse ONNX tensors whose data does not match their dims, before any is read or converted.

    In-file raw data must hold exactly prod(dims) * itemsize bytes. External data must be a regular
    file inside the model's folder (`inside`), its offset + length within the file,
    its length what the dims call for, and all the bytes referenced from a file at most twice what it
    holds on disk (st_blocks) plus `SPARSE_SLACK`: the ONNX reader reads each location whole, so a
    sparse 3 GiB file took 6.6 GB of memory before its size was compared with anything.
    """
    from onnx import external_data_helper

    referenced: dict[str, int] = {}
    stats: dict[str, os.stat_result] = {}
    for t in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(t):
            if t.HasField("raw_data") and len(t.raw_data) != _declared(t, path):
                raise CorruptFile(f"{path}: tensor {t.name!r} declares dims {list(t.dims)} that do not fit its "
                               f"{len(t.raw_data)} bytes of data")
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if not inside(base, location):
            raise CorruptFile(f"{path}: external data {location!r} of {t.name!r} lies outside the model's folder")
        real = os.path.realpath(base / location)
        if real not in stats:
            stats[real] = regular_file(Path(real), "external data")
        size = stats[real].st_size
        try:
            offset = int(info.get("offset") or 0)
            length = int(info["length"]) if info.get("length") else size - offset
        except ValueError as e:
            raise CorruptFile(f"{path}: external data of {t.name!r} has a malformed offset or length") from e
        want = _declared(t, path)
        if offset < 0 or length < 0 or offset + length > size:
            raise CorruptFile(f"{path}: external data of {t.name!r} reaches past the end of {location!r}")
        if length != want:
            raise CorruptFile(f"{path}: external data of {t.name!r} holds {length} bytes where its dims call "
                              f"for {want}")
        referenced[real] = referenced.get(real, 0) + length
    for real, total in referenced.items():
        on_disk = getattr(stats[real], "st_blocks", None)
        if on_disk is not None and total > 2 * on_disk * 512 + SPARSE_SLACK:
            raise CorruptFile(f"{path}: external data file {Path(real).name!r} is sparse ({total} bytes referenced, "
                           f"{on_disk * 512} stored on disk)")
