"""ONNX: initializers and Constant nodes, quantized weights dequantized under the quantized
initializer's name, each converted to float32 only when asked for.

Only the parsed model is kept. Converting every tensor up front held the protobuf, the converted
arrays and their float32 copies at once: `trace` of a 600 MB float32 file peaked at 2.1 GB, above
the bound of twice the file plus 500 MB. Shapes come from dims, so `trace` picks candidates without
reading; external data is read from its file per tensor, after `untrusted.check_onnx` has checked
every location, offset and length from the metadata alone.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadInput, first_line
from . import untrusted
from .source import Deferred, Reader, TensorSource, dequantize, dequantized_shape


@dataclass(frozen=True)
class _Quantized:
    """A quantized weight: its int tensor, scale and zero point as stored, and how they line up."""

    q: object  # onnx.TensorProto, as are scale and zero
    scale: object
    zero: object | None
    axis: int
    block: int


def _parse(path: Path):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise BadInput(f"{path}: corrupt or truncated ONNX file") from e


def _open_external(model, base: Path, path: Path) -> None:
    """Open (and close) each external data file the way onnx reads it, so that a file it refuses (a
    symbolic link, no permission) is refused now, as when all external data was read up front."""
    from onnx import external_data_helper

    opener = getattr(external_data_helper, "_open_external_data_fd", None)
    seen: set[str] = set()
    for t in external_data_helper._get_all_tensors(model):
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        if opener is None or not external_data_helper.uses_external_data(t) or location in seen:
            continue
        seen.add(location)
        try:
            os.close(opener(str(base), location, t.name, True))
        except Exception as e:
            raise BadInput(f"{path}: external data is missing or unreadable ({first_line(e)})") from e


def _tensors(graph, path: Path) -> dict[str, object]:
    """Initializers and Constant values by name. Those whose data `check_onnx` could not size (typed
    fields rather than raw bytes; exporters write weights as raw bytes) are converted once now, so
    that corrupt data is refused up front, and dropped."""
    from onnx import external_data_helper, helper, numpy_helper

    raw = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    raw[node.output[0]] = attr.t
    try:
        for t in raw.values():
            if t.HasField("segment"):
                raise ValueError("Currently not supporting loading segments.")
            if not external_data_helper.uses_external_data(t) and not t.HasField("raw_data"):
                numpy_helper.to_array(t)
            helper.tensor_dtype_to_np_dtype(t.data_type)
    except Exception as e:
        raise BadInput(f"{path}: corrupt ONNX tensor data ({first_line(e)})") from e
    return raw


def _quantized(graph, raw: dict[str, object]) -> tuple[dict[str, _Quantized], set[str]]:
    """Quantized weights by the quantized initializer's name, and the names of their scales and
    zero points (not weights themselves)."""
    out: dict[str, _Quantized] = {}
    qparams: set[str] = set()
    for node in graph.node:
        ins = list(node.input)
        if node.op_type == "DequantizeLinear" and len(ins) > 1 and ins[0] in raw and ins[1] in raw:
            attrs = {a.name: a.i for a in node.attribute}
            zero = raw.get(ins[2]) if len(ins) > 2 and ins[2] else None
            stem = ins[0]
            out[stem] = _Quantized(raw[stem], raw[ins[1]], zero, attrs.get("axis", 1), attrs.get("block_size", 0))
            qparams.update(ins[1:])
        elif node.op_type in ("ConvInteger", "MatMulInteger") and len(ins) > 1 and ins[1] in raw:
            # onnxruntime's quantize_dynamic: the int8 weight is input 1, its scale sits beside it by name
            stem = ins[1]
            scale = raw.get(f"{stem.removesuffix('_quantized')}_scale")
            if scale is None:
                continue
            q, zero = raw[stem], raw.get(ins[3]) if len(ins) > 3 and ins[3] else None
            axis = 0 if node.op_type == "ConvInteger" else len(q.dims) - 1  # output channels
            out[stem] = _Quantized(q, scale, zero, axis, 0)
            qparams.update({f"{stem.removesuffix('_quantized')}_scale", *ins[3:]})
    return out, qparams


def _is_float(t) -> bool:
    from onnx import helper

    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    # bfloat16 / float8 are ml_dtypes types that numpy does not class as floating
    return dtype.kind == "f" or dtype.name.startswith(("bfloat16", "float8"))


def _packed() -> set[int]:
    from onnx import TensorProto

    names = ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2", "FLOAT6E2M3", "FLOAT6E3M2")
    return {getattr(TensorProto, n) for n in names if hasattr(TensorProto, n)}


def _external_bytes(t, base: Path, path: Path) -> bytes:
    """A tensor's bytes from its external file, read now: only its own, once, the way onnx reads them."""
    from onnx import TensorProto, external_data_helper

    try:
        read = getattr(external_data_helper, "_read_external_data_bytes", None)
        if read is not None:
            return read(t, str(base))
        copy = TensorProto()  # older onnx: load into a copy, which holds no data of its own
        copy.CopyFrom(t)
        external_data_helper.load_external_data_for_tensor(copy, str(base))
        return copy.raw_data
    except Exception as e:
        raise BadInput(f"{path}: external data is missing or unreadable ({first_line(e)})") from e


def _array(t, base: Path, path: Path) -> np.ndarray:
    """A tensor as stored (int8, float16, ...), converted from the parsed model or its external file."""
    from onnx import TensorProto, external_data_helper, helper, numpy_helper

    external = external_data_helper.uses_external_data(t)
    data = _external_bytes(t, base, path) if external else None
    try:
        if not external:
            return numpy_helper.to_array(t)
        if t.data_type in _packed():  # several elements a byte: onnx unpacks them
            return numpy_helper.to_array(TensorProto(data_type=t.data_type, dims=t.dims, raw_data=data))
        a = np.frombuffer(data, dtype=helper.tensor_dtype_to_np_dtype(t.data_type))
        if sys.byteorder == "big":  # stored little-endian
            a = a.byteswap()
        return a.reshape(tuple(t.dims))
    except Exception as e:
        raise BadInput(f"{path}: corrupt ONNX tensor data ({first_line(e)})") from e


def open_onnx(path: Path) -> TensorSource:
    """Checks before anything is read or converted (`untrusted.check_onnx`); each weight's shape
    from dims (a quantized weight's from its scale's), its data converted when asked for."""
    model = _parse(path)
    base = path.parent
    untrusted.check_onnx(model, base, path)
    _open_external(model, base, path)
    graph = model.graph
    raw = _tensors(graph, path)
    quantized, qparams = _quantized(graph, raw)
    shapes: dict[str, tuple[int, ...]] = {}
    for stem, w in quantized.items():
        try:
            shapes[stem] = dequantized_shape(tuple(w.q.dims), tuple(w.scale.dims),
                                             None if w.zero is None else tuple(w.zero.dims), w.axis, w.block)
        except (ValueError, IndexError) as e:
            raise BadInput(f"{path}: quantized weight {stem!r} does not fit its scale ({first_line(e)})") from e
    plain = {}
    for name, t in raw.items():
        # int tensors that are not quantized weights are shapes, indices and the like; scalars are constants
        if name not in shapes and name not in qparams and _is_float(t) and math.prod(t.dims) > 1:
            shapes[name], plain[name] = tuple(t.dims), t

    def convert(name: str) -> np.ndarray:
        if name in plain:
            return _array(plain[name], base, path).astype(np.float32)
        w = quantized[name]
        q, scale = _array(w.q, base, path), _array(w.scale, base, path)
        zero = None if w.zero is None else _array(w.zero, base, path)
        try:
            return dequantize(q, scale, zero, w.axis, w.block)
        except (ValueError, IndexError) as e:
            raise BadInput(f"{path}: quantized weight {name!r} does not fit its scale ({first_line(e)})") from e

    source = Deferred(shapes, convert)
    source.model = model  # the tensors above live in it
    return source


READER = Reader(
    name="ONNX",
    magic=lambda head: head[:1] == b"\x08",  # ModelProto field 1 (ir_version) comes first
    open=open_onnx,
    suffixes=(".onnx",),
    folder_names=(".onnx",),
    folder_label=".onnx",
)
