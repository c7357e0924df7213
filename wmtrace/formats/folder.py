"""Model folders and safetensors index files: which files count as the model, and that every one of
them is a regular file inside the folder (a leaked folder is untrusted like a file)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import BadInput, first_line
from . import untrusted
from .safetensors import open_shards
from .source import Reader, TensorSource

INDEX = ".safetensors.index.json"


def open_index(path: Path) -> TensorSource:
    """The shards a Hugging Face index names, each inside the index's folder and a regular file."""
    untrusted.regular_file(path)
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        if not shards or not all(isinstance(s, str) for s in shards):
            raise ValueError("weight_map names no shard files")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadInput(f"{path}: not a valid safetensors index ({first_line(e)})") from e
    for s in shards:
        if not untrusted.inside(path.parent, s):
            raise BadInput(f"{path}: shard {s!r} lies outside the index's folder")
        if not (path.parent / s).exists():
            raise BadInput(f"{path}: shard {s} is missing")
        untrusted.regular_file(path.parent / s, "shard")
    return open_shards([path.parent / s for s in shards])


def _listing(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} or {labels[-1]}"


def open_folder(path: Path, readers: Sequence[Reader], open_file: Callable[[Path], TensorSource]) -> TensorSource:
    """The model a folder holds: an index wins; then, in the order of `readers`, the first format
    with files there: read together when it reads several as one (shards), else its single file
    (`open_file`, which tells the format by content). A single .onnx thus wins over a checkpoint:
    its external data may well end in .bin."""
    names = tuple(n for r in readers for n in r.folder_names)
    files = untrusted.model_files(path, (INDEX, *names))
    index = [p for p in files if p.name.endswith(INDEX)]
    if index:
        return open_index(index[0])
    for r in readers:
        found = [p for p in files if p.name.endswith(r.folder_names)]
        if found and r.open_many is not None:
            return r.open_many(found)
        if len(found) == 1:
            return open_file(found[0])
        if found:
            raise BadInput(f"{path}: folder holds several model files ({', '.join(p.name for p in found[:3])})")
    labels = [r.folder_label for r in readers if r.folder_label]
    raise BadInput(f"{path}: folder holds no single model file ({_listing(labels)})")
