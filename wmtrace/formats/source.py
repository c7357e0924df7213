"""What every reader returns (`TensorSource`), what every reader declares (`Reader`), and the
conversions they share: float32 from torch, int8 dequantized with its scale and zero point."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class TensorSource(Mapping):
    """A model's float weights by name, as float32 numpy arrays, each read only when asked for.

    `shapes` comes from file headers alone, so callers can pick the tensors worth reading: a leaked
    model may be far larger than memory allows holding as float32. `source[name]` (or `get`) reads
    one tensor; `dict(source)` reads them all.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes
        # Stored dtype names where not float32 ("float16", "bfloat16", ...), and the files read; known
        # for safetensors, from their headers (copies are written back in the master's dtypes and shards).
        self.dtypes: dict[str, str] = {}
        self.files: list[Path] = []
        # GGUF type of every tensor ("Q4_1", "F32", ...) where the format stores one: copies are written in them.
        self.quants: dict[str, str] = {}

    def load(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.shapes:
            raise KeyError(name)
        return self.load(name)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


class Deferred(TensorSource):
    """Weights held as the format parsed them (torch tensors, ONNX protobufs), each converted to
    float32 by `convert(name)` only when asked for: converting them all up front could take many
    times the file's size (a checkpoint's thousand views of one storage; an ONNX file's float32
    copies beside its parsed protobuf)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], convert: Callable[[str], np.ndarray]):
        super().__init__(shapes)
        self._convert = convert

    def load(self, name: str) -> np.ndarray:
        return self._convert(name)


@dataclass(frozen=True)
class Reader:
    """How one weight format is recognised and opened; `wmtrace.formats.READERS` lists them in the
    order tried, so a new format is one module declaring one of these.

    A file is told by content first (`magic`, over its first 16 bytes), by name only when no reader
    claims the content (`suffixes`: a file too short to carry its header). In a folder, files named
    like `folder_names` count as model files of this format: `open_many` reads several as one model
    (shards); without it the folder must hold exactly one.
    """

    name: str  # in "unknown format (expected safetensors, ONNX or a PyTorch checkpoint)"
    magic: Callable[[bytes], bool]
    open: Callable[[Path], TensorSource]
    suffixes: tuple[str, ...] = ()
    folder_names: tuple[str, ...] = ()
    folder_label: str = ""  # in "folder holds no single model file (safetensors shards, .onnx or a checkpoint)"
    open_many: Callable[[list[Path]], TensorSource] | None = None


def float32(t: torch.Tensor) -> np.ndarray | None:
    if not t.is_floating_point():
        return None
    return t.detach().to(torch.float32).cpu().numpy()


def _scale_like(shape: tuple[int, ...], s: np.ndarray, z: np.ndarray | None, axis: int,
                block: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point laid out to broadcast over a quantized tensor of `shape`."""
    z = np.zeros_like(s) if z is None else z
    if s.ndim == 1 and len(shape) > 1:  # per channel
        layout = [1] * len(shape)
        layout[axis] = -1
        s, z = s.reshape(layout), z.reshape(layout)
    elif s.ndim == len(shape) and s.shape != tuple(shape) and block:  # blocked (opset 21)
        s = np.repeat(s, block, axis=axis)[tuple(slice(0, n) for n in shape)]
        z = np.repeat(z, block, axis=axis)[tuple(slice(0, n) for n in shape)]
    return s, z


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int, block: int = 0) -> np.ndarray:
    """(q - zero_point) * scale, per tensor, per channel along `axis`, or per block of `block` along it."""
    s, z = _scale_like(q.shape, np.asarray(scale, np.float32),
                       None if zero is None else np.asarray(zero).astype(np.float32), axis, block)
    return (q.astype(np.float32) - z) * s


def dequantized_shape(shape: tuple[int, ...], scale: tuple[int, ...], zero: tuple[int, ...] | None, axis: int,
                      block: int = 0) -> tuple[int, ...]:
    """The shape `dequantize` returns, from the shapes alone; raises where it would (ValueError,
    IndexError), so a weight that does not fit its scale is refused before anything is read.
    Stand-ins of the scale's shape are one byte an element and never written (calloc)."""
    s, z = _scale_like(shape, np.zeros(scale, np.bool_), None if zero is None else np.zeros(zero, np.bool_),
                       axis, block)
    return _broadcast(_broadcast(tuple(shape), z.shape), s.shape)  # (q - z) * s


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of an elementwise operation on arrays of shapes `a` and `b`, refused in numpy's words."""
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        shapes = " ".join(f"({','.join(map(str, x))}{',' if len(x) == 1 else ''})" for x in (a, b))
        raise ValueError(f"operands could not be broadcast together with shapes {shapes} ") from None
