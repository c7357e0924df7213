"""safetensors, one file or several shards of one model: headers read up front, each tensor read from
its shard only when asked for.

int8 convention: NAME (int8/uint8) + NAME_scale (+ NAME_zero_point), per tensor or per output
channel, as `wmtrace.attacks.quantize` and compressed-tensors store them; such a weight comes back
dequantized as float32 under NAME.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInput, first_line
from .source import Reader, TensorSource, dequantize, float32

# safetensors dtypes that torch reads as floating point (BF16 and the float8 types included)
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_INT8_DTYPES = {"I8", "U8"}
_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F64": "float64"}  # torch's names; float32 is the default


@dataclass(frozen=True)
class _Entry:
    """Where one weight lives: its shard, its name there, and for int8 weights the scale and zero point."""

    file: Path
    key: str
    shape: tuple[int, ...]
    scale: str | None = None
    zero: str | None = None
    dtype: str = "F32"  # as stored (safetensors' name); int8 weights keep F32: they come back dequantized


def _corrupt(path: Path, e: BaseException) -> BadInput:
    return BadInput(f"{path}: corrupt or truncated safetensors file ({first_line(e)})")


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """dtype and shape of every tensor of a safetensors file, from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                sl = f.get_slice(name)
                out[name] = (sl.get_dtype(), tuple(sl.get_shape()))
            return out
    except Exception as e:  # safetensors raises its own error types for truncation and bad headers
        raise _corrupt(path, e) from e


def _shard_entries(path: Path) -> dict[str, _Entry]:
    """The weights one shard holds. Quantized weights are listed under NAME; their scale and zero
    point are not weights themselves."""
    header = _header(path)
    floats = {k: shape for k, (dtype, shape) in header.items() if dtype in _FLOAT_DTYPES}
    out = {k: _Entry(path, k, shape, dtype=header[k][0]) for k, shape in floats.items()}
    for name, (dtype, shape) in header.items():
        if dtype not in _INT8_DTYPES or len(shape) < 2 or f"{name}_scale" not in floats:
            continue
        scale = f"{name}_scale"
        out.pop(scale, None)
        zero = f"{name}_zero_point"
        out.pop(zero, None)
        zero_dtype, zero_shape = header.get(zero, ("", ()))
        has_zero = zero_dtype in _FLOAT_DTYPES | _INT8_DTYPES
        size = math.prod(floats[scale])
        if size not in (1, shape[0]) or (has_zero and math.prod(zero_shape) != size):
            raise BadInput(f"{path}: quantized weight {name!r} does not fit its scale")
        out[name] = _Entry(path, name, shape, scale, zero if has_zero else None)
    return out


def _read(e: _Entry, f) -> np.ndarray:
    """One weight as float32, dequantized when stored as int8; `f` is its shard, open (`safe_open`)."""
    try:
        t = f.get_tensor(e.key)  # torch, since numpy has no bfloat16
        if e.scale is None:
            return float32(t)
        s = f.get_tensor(e.scale).to(torch.float32).numpy().reshape(-1)
        zero = None if e.zero is None else f.get_tensor(e.zero).to(torch.float32).numpy().reshape(-1)
    except Exception as err:
        raise _corrupt(e.file, err) from err
    per_channel = s.size > 1
    try:
        return dequantize(t.numpy(), s if per_channel else s.reshape(()),
                          None if zero is None else zero.reshape(-1 if per_channel else ()), 0)
    except ValueError as err:  # the header promised shapes that the data does not keep
        raise BadInput(f"{e.file}: quantized weight {e.key!r} does not fit its scale ({first_line(err)})") from err


class _LazySafetensors(TensorSource):
    def __init__(self, entries: dict[str, _Entry]):
        super().__init__({k: e.shape for k, e in entries.items()})
        self._entries = entries
        self.dtypes = {k: _DTYPE_NAMES[e.dtype] for k, e in entries.items() if e.dtype in _DTYPE_NAMES}
        self.files = sorted({e.file for e in entries.values()})
        # Shards stay open once read: opening one parses its whole header, so reopening it for every
        # tensor made reading n tensors cost n^2 (2,000 decoy tensors: 6 s of header parsing).
        self._open: dict[Path, object] = {}

    def load(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        e = self._entries[name]
        if e.file not in self._open:
            if len(self._open) >= 64:  # a folder of thousands of shards must not run out of file handles
                self._open.clear()
            try:
                self._open[e.file] = safe_open(str(e.file), framework="pt")
            except Exception as err:
                raise _corrupt(e.file, err) from err
        return _read(e, self._open[e.file])


def open_shards(shards: list[Path]) -> TensorSource:
    """Several safetensors files read as one model (shards, or a single file)."""
    entries: dict[str, _Entry] = {}
    for s in shards:
        entries.update(_shard_entries(s))
    return _LazySafetensors(entries)


def _magic(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{"  # 8-byte header length, then the JSON header


READER = Reader(
    name="safetensors",
    magic=_magic,
    open=lambda path: open_shards([path]),
    suffixes=(".safetensors",),  # too short to carry its header: let the reader say what is wrong
    folder_names=(".safetensors",),
    folder_label="safetensors shards",
    open_many=open_shards,
)
