"""Weight files out: safetensors (one file, or Hugging Face shards) and ONNX export. Every write is
atomic: a reader never sees half a file or half a folder."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInput, first_line
from . import stream


def save_safetensors(
    tensors: dict[str, np.ndarray | torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write atomically: a reader never sees half a file, and a full disk leaves the old one intact.
    The bytes are those `safetensors.torch.save_file` writes, produced by `stream` (the writer that
    also materializes copies from patches, so a full copy and a materialized one are the same bytes)."""
    path = Path(path)
    ts = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for k, v in tensors.items()}
    try:
        stream.write_atomic(path, stream.tensors_chunks(ts, metadata), digest=False)
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"{path}: cannot write ({first_line(e)})") from e


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
    target and renamed into place (`atomic_folder`)."""
    folder = Path(folder)
    if folder.exists():
        raise BadInput(f"{folder}: already exists")
    names = list(tensors)
    sizes = np.array([tensors[k].numel() * tensors[k].element_size() for k in names], dtype=np.int64)
    bounds = np.searchsorted(np.cumsum(sizes), np.arange(1, shards) * sizes.sum() / shards)
    groups = [g for g in np.split(np.arange(len(names)), bounds) if len(g)]
    with atomic_folder(folder) as tmp:
        weight_map: dict[str, str] = {}
        for i, group in enumerate(groups, start=1):
            shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            save_safetensors({names[j]: tensors[names[j]] for j in group}, tmp / shard)
            weight_map.update({names[j]: shard for j in group})
        index = {"metadata": {"total_size": int(sizes.sum())}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """A hidden folder beside `folder` to fill, renamed into place when the block ends without error and
    removed otherwise, so a reader never sees half a folder; an OSError is one BadInput line."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True)
        yield tmp
        os.replace(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BadInput(f"{folder}: cannot write ({e.strerror or first_line(e)})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def writable_folder(folder: str | os.PathLike) -> None:
    """Make `folder` if needed and prove it writable before any work whose result would go there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".wmtrace-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise BadInput(f"{folder}: output folder is not writable ({e.strerror})") from e
