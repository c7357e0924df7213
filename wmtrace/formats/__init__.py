"""Read and write weight files without model code; a leaked file is untrusted input.

Formats are told by content, not by extension. Checkpoints are only ever opened with
`torch.load(weights_only=True)`; ONNX external data and safetensors shards are only read from
inside the model's own folder, and only from regular files. Every failure is a one-line `BadInput`.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import stat
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInput
from . import untrusted
from .untrusted import inside as _inside

CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _line(e: BaseException) -> str:
    """First line of an error, short enough for a one-line report."""
    lines = str(e).strip().splitlines()
    first = lines[0].split(". ")[0] if lines else type(e).__name__
    return first[:160]


def _float32(t: torch.Tensor) -> np.ndarray | None:
    if not t.is_floating_point():
        return None
    return t.detach().to(torch.float32).cpu().numpy()


def _kind(path: Path) -> str:
    head = untrusted.read_head(path, 16)
    if not head:
        raise BadInput(f"{path}: file is empty")
    if len(head) >= 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # zip (torch.save) or legacy pickle
        return "checkpoint"
    if head[:1] == b"\x08" or path.suffix == ".onnx":  # ModelProto field 1 (ir_version) comes first
        return "onnx"
    if path.suffix == ".safetensors":  # too short to carry its header: let the reader say what is wrong
        return "safetensors"
    raise BadInput(f"{path}: unknown format (expected safetensors, ONNX or a PyTorch checkpoint)")


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
        raise BadInput(f"{path}: corrupt or truncated safetensors file ({_line(e)})") from e


def _shard_entries(path: Path) -> dict[str, _Entry]:
    """The weights one shard holds. Quantized weights are NAME (int8/uint8) + NAME_scale (+ NAME_zero_point),
    per tensor or per output channel, as `wmtrace.attacks.quantize` and compressed-tensors store them;
    they are listed under NAME, and their scale and zero point are not weights themselves."""
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
            return _float32(t)
        s = f.get_tensor(e.scale).to(torch.float32).numpy().reshape(-1)
        zero = None if e.zero is None else f.get_tensor(e.zero).to(torch.float32).numpy().reshape(-1)
    except Exception as err:
        raise BadInput(f"{e.file}: corrupt or truncated safetensors file ({_line(err)})") from err
    per_channel = s.size > 1
    try:
        return _dequantize(t.numpy(), s if per_channel else s.reshape(()),
                           None if zero is None else zero.reshape(-1 if per_channel else ()), 0)
    except ValueError as err:  # the header promised shapes that the data does not keep
        raise BadInput(f"{e.file}: quantized weight {e.key!r} does not fit its scale ({_line(err)})") from err


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
                raise BadInput(f"{e.file}: corrupt or truncated safetensors file ({_line(err)})") from err
        return _read(e, self._open[e.file])


class _Loaded(TensorSource):
    """Formats read whole (ONNX), behind the same interface."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        super().__init__({k: tuple(v.shape) for k, v in arrays.items()})
        self._arrays = arrays

    def load(self, name: str) -> np.ndarray:
        return self._arrays[name]


def _safetensors(*shards: Path) -> TensorSource:
    entries: dict[str, _Entry] = {}
    for s in shards:
        entries.update(_shard_entries(s))
    return _LazySafetensors(entries)


class _LazyTorch(TensorSource):
    """A loaded checkpoint's float tensors, each converted to float32 only when asked for: tensors
    may share one storage (tied weights, or a hostile file's thousand views of it), so converting
    them all up front could take many times the file's size."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__({k: tuple(v.shape) for k, v in tensors.items()})
        self._tensors = tensors

    def load(self, name: str) -> np.ndarray:
        return _float32(self._tensors[name])


def _checkpoint(path: Path) -> TensorSource:
    """Checks before loading (zip members: `untrusted.check_zip`) and after (strides:
    `untrusted.check_strides`); legacy (non-zip) checkpoints need no check before: torch reads their
    storages from the file as it goes, so a declared size beyond the file fails without the memory
    (a 4 GiB storage declared in a 4 MB file: refused at 0.3 GB)."""
    if untrusted.read_head(path, 4) == b"PK\x03\x04":
        untrusted.check_zip(path, os.stat(path).st_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notices are not the user's concern
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported (?:global|class):? (?:GLOBAL )?([\w.]+)", str(e))
        if found:
            raise BadInput(f"{path}: not a plain state dict (refusing to unpickle arbitrary objects such as "
                           f"{found.group(1)})") from e
        raise BadInput(f"{path}: corrupt checkpoint or not a plain state dict") from e
    except Exception as e:  # zip errors, truncation, unknown storage types, allocations refused
        raise BadInput(f"{path}: corrupt or truncated checkpoint ({_line(e)})") from e
    if isinstance(obj, dict):
        for k in CHECKPOINT_KEYS:
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    tensors = untrusted.tensors_in(obj)
    untrusted.check_strides(path, tensors)
    out = {k: t for k, t in tensors if t.layout == torch.strided and t.is_floating_point()}
    if not out:
        raise BadInput(f"{path}: checkpoint holds no floating-point tensors")
    return _LazyTorch(out)


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int, block: int = 0) -> np.ndarray:
    """(q - zero_point) * scale, per tensor, per channel along `axis`, or per block of `block` along it."""
    s = np.asarray(scale, np.float32)
    z = np.zeros_like(s) if zero is None else np.asarray(zero).astype(np.float32)
    if s.ndim == 1 and q.ndim > 1:  # per channel
        shape = [1] * q.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    elif s.ndim == q.ndim and s.shape != q.shape and block:  # blocked (opset 21)
        s = np.repeat(s, block, axis=axis)[tuple(slice(0, n) for n in q.shape)]
        z = np.repeat(z, block, axis=axis)[tuple(slice(0, n) for n in q.shape)]
    return (q.astype(np.float32) - z) * s


def _is_float(a: np.ndarray) -> bool:
    # ONNX bfloat16 / float8 arrive as ml_dtypes types that numpy does not class as floating
    return a.dtype.kind == "f" or a.dtype.name.startswith(("bfloat16", "float8"))


def _onnx(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import external_data_helper, numpy_helper

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise BadInput(f"{path}: corrupt or truncated ONNX file") from e
    base = path.parent
    untrusted.check_onnx(model, base, path)  # before anything is read or converted
    try:
        external_data_helper.load_external_data_for_model(model, str(base))
    except Exception as e:
        raise BadInput(f"{path}: external data is missing or unreadable ({_line(e)})") from e

    graph = model.graph
    raw: dict[str, np.ndarray] = {}
    try:
        for init in graph.initializer:
            raw[init.name] = numpy_helper.to_array(init)
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value":
                        raw[node.output[0]] = numpy_helper.to_array(attr.t)
    except Exception as e:
        raise BadInput(f"{path}: corrupt ONNX tensor data ({_line(e)})") from e

    # Quantized weights come back dequantized under the name of the quantized initializer.
    out: dict[str, np.ndarray] = {}
    qparams: set[str] = set()  # scales and zero points: not weights themselves
    for node in graph.node:
        ins = list(node.input)
        if node.op_type == "DequantizeLinear" and len(ins) > 1 and ins[0] in raw and ins[1] in raw:
            attrs = {a.name: a.i for a in node.attribute}
            zero = raw.get(ins[2]) if len(ins) > 2 and ins[2] else None
            q, stem, scale = raw[ins[0]], ins[0], raw[ins[1]]
            axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
            qparams.update(ins[1:])
        elif node.op_type in ("ConvInteger", "MatMulInteger") and len(ins) > 1 and ins[1] in raw:
            # onnxruntime's quantize_dynamic: the int8 weight is input 1, its scale sits beside it by name
            stem = ins[1]
            scale = raw.get(f"{stem.removesuffix('_quantized')}_scale")
            if scale is None:
                continue
            q, zero = raw[stem], raw.get(ins[3]) if len(ins) > 3 and ins[3] else None
            axis, block = (0 if node.op_type == "ConvInteger" else q.ndim - 1), 0  # output channels
            qparams.update({f"{stem.removesuffix('_quantized')}_scale", *ins[3:]})
        else:
            continue
        try:
            out[stem] = _dequantize(q, scale, zero, axis, block)
        except (ValueError, IndexError) as e:
            raise BadInput(f"{path}: quantized weight {stem!r} does not fit its scale ({_line(e)})") from e
    for name, a in raw.items():
        # int initializers that are not quantized weights are shapes, indices and the like; scalars are constants
        if name not in out and name not in qparams and _is_float(a) and a.size > 1:
            out[name] = a.astype(np.float32)
    return out


def _folder(path: Path) -> TensorSource:
    files = untrusted.model_files(path, (".safetensors", ".safetensors.index.json", ".onnx", *CHECKPOINT_SUFFIXES))
    index = [p for p in files if p.name.endswith(".safetensors.index.json")]
    if index:
        return _index(index[0])
    shards = [p for p in files if p.name.endswith(".safetensors")]
    if shards:
        return _safetensors(*shards)
    # A single .onnx wins (its external data may well end in .bin); otherwise a single checkpoint.
    for suffixes in ((".onnx",), CHECKPOINT_SUFFIXES):
        found = [p for p in files if p.suffix in suffixes]
        if len(found) == 1:
            return open_tensors(found[0])
        if found:
            raise BadInput(f"{path}: folder holds several model files ({', '.join(p.name for p in found[:3])})")
    raise BadInput(f"{path}: folder holds no single model file (safetensors shards, .onnx or a checkpoint)")


def _index(path: Path) -> TensorSource:
    untrusted.regular_file(path)
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        if not shards or not all(isinstance(s, str) for s in shards):
            raise ValueError("weight_map names no shard files")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadInput(f"{path}: not a valid safetensors index ({_line(e)})") from e
    for s in shards:
        if not _inside(path.parent, s):
            raise BadInput(f"{path}: shard {s!r} lies outside the index's folder")
        if not (path.parent / s).exists():
            raise BadInput(f"{path}: shard {s} is missing")
        untrusted.regular_file(path.parent / s, "shard")
    return _safetensors(*(path.parent / s for s in shards))


def open_tensors(path: str | os.PathLike) -> TensorSource:
    """The floating-point weights of a model file or folder, each read as float32 only when asked for.

    Accepts safetensors (single, sharded index, or a folder of them), ONNX (initializers and
    Constant nodes; quantized weights dequantized under the quantized initializer's name) and
    PyTorch checkpoints holding plain (possibly nested) state dicts. Integer tensors are dropped.
    safetensors are read lazily (headers up front, one tensor per request); checkpoints are loaded
    whole and converted one tensor per request; ONNX has no cheap per-tensor access and is read whole.
    Only regular files are opened (a fifo or a link to a device is "not a regular file"); what a
    file declares is checked against what it holds before memory is allocated for it
    (`wmtrace.untrusted`).
    """
    path = Path(path)
    try:
        st = os.stat(path)  # symlinks followed: a link to /dev/zero is a device, not a file
    except FileNotFoundError as e:
        raise BadInput(f"{path}: no such file") from e
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: cannot read ({getattr(e, 'strerror', None) or _line(e)})") from e
    if stat.S_ISDIR(st.st_mode):
        return _folder(path)
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"{path}: not a regular file")
    if path.name.endswith(".index.json"):
        return _index(path)
    try:
        kind = _kind(path)
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or _line(e)})") from e
    if kind == "safetensors":
        source = _safetensors(path)
    elif kind == "checkpoint":
        source = _checkpoint(path)
    else:
        source = _Loaded(_onnx(path))
    if not source:
        raise BadInput(f"{path}: holds no floating-point weights")
    return source


def load_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All floating-point weights of a model file or folder (see `open_tensors`), read now."""
    return dict(open_tensors(path))


def save_safetensors(
    tensors: dict[str, np.ndarray | torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write atomically: a reader never sees half a file, and a full disk leaves the old one intact."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    ts: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in tensors.items():
        t = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach().cpu().contiguous()
        storage = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if storage in seen and t.numel():  # tied weights: safetensors refuses shared memory
            t = t.clone()
        seen.add(storage)
        ts[k] = t
    try:
        save_file(ts, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        reason = e.strerror if isinstance(e, OSError) and e.strerror else _line(e)
        raise BadInput(f"{path}: cannot write ({reason})") from e


def export_onnx(model: torch.nn.Module, sample: torch.Tensor, path: str | os.PathLike, dynamo: bool = False) -> None:
    """ONNX export as a deployer would do it: eval mode, constant folding (BatchNorm folded into convs)."""
    model.eval()
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (sample,), str(path), dynamo=dynamo, do_constant_folding=True,
                              input_names=["input"], output_names=["logits"],
                              **({} if dynamo else {"dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}}))
        except OSError as e:
            raise BadInput(f"{path}: cannot write ({e.strerror})") from e


def save_sharded(tensors: dict[str, torch.Tensor], folder: str | os.PathLike, shards: int) -> None:
    """Write a Hugging Face sharded layout: model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json, tensors kept in order and split by size. Written beside the
    target and renamed into place, so a reader never sees half a folder."""
    import shutil

    folder = Path(folder)
    if folder.exists():
        raise BadInput(f"{folder}: already exists")
    names = list(tensors)
    sizes = np.array([tensors[k].numel() * tensors[k].element_size() for k in names], dtype=np.int64)
    bounds = np.searchsorted(np.cumsum(sizes), np.arange(1, shards) * sizes.sum() / shards)
    groups = [g for g in np.split(np.arange(len(names)), bounds) if len(g)]
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True)
        weight_map: dict[str, str] = {}
        for i, group in enumerate(groups, start=1):
            shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            save_safetensors({names[j]: tensors[names[j]] for j in group}, tmp / shard)
            weight_map.update({names[j]: shard for j in group})
        index = {"metadata": {"total_size": int(sizes.sum())}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        os.replace(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BadInput(f"{folder}: cannot write ({e.strerror or _line(e)})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
