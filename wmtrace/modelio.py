"""Model code and data named by the user: import them, build the master's model, hold its data.

Shared by registration, issuing and the training attacks; it imports nothing of theirs, which is what
keeps `embed` and `attacks` from importing the API.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from . import batches
from .errors import BadInput, first_line
from .registry import Master


def import_object(spec: str) -> Callable:
    """`module:attr` -> the object. The module must be importable (installed, or in the cwd)."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise BadInput(f"{spec!r}: expected an import path of the form module:function")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise BadInput(f"{spec!r}: cannot import ({e})") from e
    if not callable(obj):
        raise BadInput(f"{spec!r} is not callable")
    return obj


def weights_command(module: str, weights: Callable[[], Path]) -> None:
    """`python -m MODULE weights`, the bundled examples' one command: print where the weights a
    package ships are, or one line saying what is missing."""
    if sys.argv[1:] != ["weights"]:
        sys.exit(f"usage: python -m {module} weights")
    try:
        print(weights())
    except BadInput as e:
        sys.exit(f"error: {e}")


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a sharded folder's files in name order (names included)."""
    h = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_into(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> list[str]:
    """Load `state` into `model`; every floating-point tensor of the model must be there. Returns the
    names of tensors the model lacks (extra heads, adapters, unused poolers): kept, never marked."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as e:
        raise BadInput(f"{what} ({first_line(e)})") from e
    own = model.state_dict()
    missing = [k for k in missing if own[k].is_floating_point()]  # integer counters are not weights
    if missing:
        raise BadInput(f"{what} (missing {missing[0]!r})")
    return list(unexpected)


def build(m: Master) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The master's model, and the registered tensors it lacks (copied to buyers unmarked)."""
    weights = load_file(str(m.weights))
    model = import_object(m.factory)()
    extras = load_into(model, weights, f"master {m.name!r}: weights do not fit {m.factory}")
    return model.eval(), {k: weights[k] for k in extras}


def build_model(m: Master) -> nn.Module:
    return build(m)[0]


def dataset(spec: str | None, split: str) -> Dataset | None:
    if spec is None:
        return None
    ds = import_object(spec)(split)
    if ds is not None and not isinstance(ds, Dataset):
        raise BadInput(f"{spec}({split!r}) must return a torch Dataset, got {type(ds).__name__}")
    return ds


def tensors(ds: Dataset, limit: int | None = None) -> tuple[batches.Inputs, torch.Tensor | None]:
    """Held-out data in memory: inputs (a tensor, or a dict of tensors) and labels (None without)."""
    if isinstance(ds, TensorDataset):
        ts = [t[:limit] for t in ds.tensors]
        return ts[0], (ts[1] if len(ts) > 1 else None)
    xs, ys = [], []
    for x, y in stream(ds, limit):  # bounded batches: 64 crops of 224 x 224 no longer load 512 first
        xs.append(x)
        if y is not None:
            ys.append(y)
    if not xs:
        raise BadInput("the data set is empty")
    return batches.concat(xs), (torch.cat(ys) if ys else None)


def stream(ds: Dataset, limit: int | None = None) -> Iterator[tuple[batches.Inputs, torch.Tensor | None]]:
    """The first `limit` items (all: None) as (inputs, labels or None) batches of `batches.rows` each:
    data of any size passes through in bounded memory (a split of 224 x 224 crops is never held)."""
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        return
    first, _ = batches.split(ds[0])
    size = batches.rows(first)
    if isinstance(ds, TensorDataset):
        for i in range(0, n, size):
            ts = [t[i : min(i + size, n)] for t in ds.tensors]
            yield ts[0], (ts[1] if len(ts) > 1 else None)
        return
    done = 0
    for batch in DataLoader(ds, batch_size=size):
        x, y = batches.split(batch)
        keep = min(batches.size(x), n - done)
        yield batches.take(x, slice(0, keep)), (y[:keep] if y is not None else None)
        done += keep
        if done >= n:
            return


def shuffled_batches(ds: Dataset, batch_size: int, seed: int) -> Iterator:
    """Endless shuffled batches; a fresh seeded order per buyer."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield from DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True, generator=g)


