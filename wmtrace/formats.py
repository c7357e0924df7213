"""Read and write weight files without model code; a leaked file is untrusted input.

Formats are told by content, not by extension. Checkpoints are only ever opened with
`torch.load(weights_only=True)`; ONNX external data is only read from inside the model's folder.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import BadInput

CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")


def _float32(t: torch.Tensor) -> np.ndarray | None:
    if not t.is_floating_point():
        return None
    return t.detach().to(torch.float32).cpu().numpy()


def _kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise BadInput(f"{path}: file is empty")
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # zip (torch.save) or raw pickle
        return "checkpoint"
    if path.suffix == ".onnx" or head[:1] in (b"\x08", b"\x0a", b"\x12", b"\x1a", b"\x3a"):
        return "onnx"
    raise BadInput(f"{path}: unknown format (expected safetensors, ONNX or a PyTorch checkpoint)")


def _safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                a = _float32(f.get_tensor(name))
                if a is not None:
                    out[name] = a
    except Exception as e:  # safetensors raises its own error types for truncation and bad headers
        raise BadInput(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0][:120]})") from e
    return out


def _flatten(obj, prefix: str, out: dict[str, np.ndarray]) -> None:
    if isinstance(obj, torch.Tensor):
        a = _float32(obj)
        if a is not None:
            out[prefix] = a
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)


def _checkpoint(path: Path) -> dict[str, np.ndarray]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notices are not the user's concern
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError) as e:
        text = str(e)
        if "weights_only" in text or "Unsupported" in text or isinstance(e, pickle.UnpicklingError):
            raise BadInput(f"{path}: not a plain state dict (refusing to unpickle arbitrary objects)") from e
        raise BadInput(f"{path}: corrupt or truncated checkpoint") from e
    except (EOFError, zipfile.BadZipFile, OSError) as e:
        raise BadInput(f"{path}: corrupt or truncated checkpoint") from e
    if isinstance(obj, dict):
        for k in CHECKPOINT_KEYS:
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    if not out:
        raise BadInput(f"{path}: checkpoint holds no floating-point tensors")
    return out


def _inside(base: Path, location: str) -> bool:
    if os.path.isabs(location):
        return False
    target = os.path.realpath(base / location)
    return os.path.commonpath([target, os.path.realpath(base)]) == os.path.realpath(base)


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    """(q - zero) * scale, per tensor or per channel along `axis`."""
    shape = [1] * q.ndim
    if np.ndim(scale) == 1 and q.ndim > 0:
        shape[axis] = -1
    s = np.asarray(scale, np.float32).reshape(shape)
    z = np.zeros_like(s) if zero is None else np.asarray(zero, np.float32).reshape(shape)
    return (q - z) * s


def _onnx(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import external_data_helper, numpy_helper

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise BadInput(f"{path}: corrupt or truncated ONNX file") from e
    base = path.parent
    for t in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(t):
            info = {e.key: e.value for e in t.external_data}
            if not _inside(base, info.get("location", "")):
                raise BadInput(f"{path}: external data {info.get('location')!r} lies outside the model's folder")
    try:
        external_data_helper.load_external_data_for_model(model, str(base))
    except Exception as e:
        raise BadInput(f"{path}: external data is missing or unreadable ({e})") from e

    graph = model.graph
    raw: dict[str, np.ndarray] = {}
    try:
        for init in graph.initializer:
            raw[init.name] = numpy_helper.to_array(init)
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value" and node.output:
                        raw[node.output[0]] = numpy_helper.to_array(attr.t)
    except Exception as e:
        raise BadInput(f"{path}: corrupt ONNX tensor data ({e})") from e

    out: dict[str, np.ndarray] = {}
    # Quantized weights: dequantize x * scale - zero_point as DequantizeLinear would.
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in raw:
            q = raw[node.input[0]].astype(np.float32)
            scale = raw.get(node.input[1])
            zero = raw.get(node.input[2]) if len(node.input) > 2 else None
            if scale is None:
                continue
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            out[node.input[0]] = _dequantize(q, scale, zero, axis)
    # Dynamically quantized weights (onnxruntime's quantize_dynamic): ConvInteger / MatMulInteger
    # take the int8 weight as input 1; its scale and zero point sit beside it by naming convention.
    for node in graph.node:
        if node.op_type in ("ConvInteger", "MatMulInteger") and len(node.input) > 1 and node.input[1] in raw:
            name = node.input[1]
            stem = name.removesuffix("_quantized")
            scale = raw.get(f"{stem}_scale")
            if scale is None:
                continue
            q = raw[name].astype(np.float32)
            zero = raw.get(node.input[3]) if len(node.input) > 3 else None
            axis = 0 if node.op_type == "ConvInteger" else q.ndim - 1  # output channels
            out[name] = _dequantize(q, scale, zero, axis)
    for name, a in raw.items():
        if name not in out and np.issubdtype(a.dtype, np.floating) and a.size > 1:
            out[name] = a.astype(np.float32)
    return out


def _folder(path: Path) -> dict[str, np.ndarray]:
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        return _index(index[0])
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        out: dict[str, np.ndarray] = {}
        for s in shards:
            out.update(_safetensors(s))
        return out
    others = [p for p in sorted(path.iterdir()) if p.suffix in (".onnx", ".pt", ".pth", ".bin", ".ckpt")]
    if len(others) == 1:
        return load_tensors(others[0])
    raise BadInput(f"{path}: folder holds no single model file (safetensors shards, .onnx or a checkpoint)")


def _index(path: Path) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadInput(f"{path}: not a valid safetensors index") from e
    out: dict[str, np.ndarray] = {}
    for s in shards:
        if not _inside(path.parent, s):
            raise BadInput(f"{path}: shard {s!r} lies outside the index's folder")
        shard = path.parent / s
        if not shard.is_file():
            raise BadInput(f"{path}: shard {s} is missing")
        out.update(_safetensors(shard))
    return out


def load_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All floating-point weights of a model file or folder, as float32 numpy arrays by name."""
    path = Path(path)
    if path.is_dir():
        return _folder(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    if path.name.endswith(".index.json"):
        return _index(path)
    try:
        kind = _kind(path)
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})") from e
    tensors = {"safetensors": _safetensors, "checkpoint": _checkpoint, "onnx": _onnx}[kind](path)
    if not tensors:
        raise BadInput(f"{path}: holds no floating-point weights")
    return tensors


def save_safetensors(
    tensors: dict[str, np.ndarray | torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write atomically: a reader never sees half a file, and a full disk leaves the old one intact."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    ts = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.contiguous())
          for k, v in tensors.items()}
    try:
        save_file(ts, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BadInput(f"{path}: cannot write ({e.strerror})") from e
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise BadInput(f"{path}: cannot write ({e})") from e


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
