"""Read and write weight files without model code; a leaked file is untrusted input.

Formats are told by content, not by extension: each reader module declares how it recognises its
files and how it opens them (`source.Reader`), and `open_tensors` tries `READERS` in order, so a new
format is one module added there. Checkpoints are only ever opened with
`torch.load(weights_only=True)`; ONNX external data and safetensors shards are only read from
inside the model's own folder, and only from regular files. Every failure is a one-line `BadInput`.

    source.py       TensorSource, Reader, float32 and int8 conversions shared by the readers
    safetensors.py  one file or shards, lazily; the int8 + scale convention
    onnx.py         initializers, Constants, quantized weights; converted per request
    checkpoint.py   torch.load(weights_only=True); converted per request
    gguf.py         llama.cpp's GGUF: memory-mapped, dequantized per request, under Hugging Face names; written back
    grids.py        a GGUF master's quantization grid, on which its copies' marks are placed
    folder.py       which files of a folder (or an index) are the model
    untrusted.py    what a hostile file declares, checked against what it holds
    write.py        save_safetensors, save_sharded, export_onnx
    stream.py       safetensors written as a stream (header from entries, bytes chunk by chunk); a file read by range
    patch.py        a buyer's patch file: the tensors that differ from the master, and its manifest
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

from ..errors import BadInput, first_line
from . import checkpoint, folder, gguf, grids, onnx, patch, safetensors, stream, untrusted
from .safetensors import _read as _read  # tests that count safetensors reads wrap it
from .source import Reader, TensorSource
from .write import export_onnx, save_safetensors, save_sharded, writable_folder

# Tried in this order: by content first, then by name; in a folder, the first with files there wins.
READERS: list[Reader] = [safetensors.READER, gguf.READER, onnx.READER, checkpoint.READER]

__all__ = ["READERS", "Reader", "TensorSource", "export_onnx", "gguf", "grids", "load_tensors", "open_tensors",
           "patch", "save_safetensors", "save_sharded", "stream", "writable_folder"]


def _reader(path: Path) -> Reader:
    head = untrusted.read_head(path, 16)
    if not head:
        raise BadInput(f"{path}: file is empty")
    for r in READERS:
        if r.magic(head):
            return r
    for r in READERS:
        if path.name.endswith(r.suffixes) and r.suffixes:
            return r
    names = [r.name for r in READERS]
    raise BadInput(f"{path}: unknown format (expected {', '.join(names[:-1])} or {names[-1]})")


def open_tensors(path: str | os.PathLike) -> TensorSource:
    """The floating-point weights of a model file or folder, each read as float32 only when asked for.

    Accepts safetensors (single, sharded index, or a folder of them), ONNX (initializers and
    Constant nodes; quantized weights dequantized under the quantized initializer's name) and
    PyTorch checkpoints holding plain (possibly nested) state dicts. Integer tensors are dropped.
    safetensors are read lazily (headers up front, one tensor per request); checkpoints are loaded
    whole and ONNX parsed whole, each tensor converted per request (ONNX external data read per
    request). Only regular files are opened (a fifo or a link to a device is "not a regular file");
    what a file declares is checked against what it holds before memory is allocated for it
    (`untrusted`).
    """
    path = Path(path)
    try:
        st = os.stat(path)  # symlinks followed: a link to /dev/zero is a device, not a file
    except FileNotFoundError as e:
        raise BadInput(f"{path}: no such file") from e
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: cannot read ({getattr(e, 'strerror', None) or first_line(e)})") from e
    if stat.S_ISDIR(st.st_mode):
        return folder.open_folder(path, READERS, open_tensors)
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"{path}: not a regular file")
    if path.name.endswith(".index.json"):
        return folder.open_index(path)
    try:
        reader = _reader(path)
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or first_line(e)})") from e
    source = reader.open(path)
    if not source:
        raise BadInput(f"{path}: holds no floating-point weights")
    return source


def load_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All floating-point weights of a model file or folder (see `open_tensors`), read now."""
    return dict(open_tensors(path))
