"""PyTorch checkpoints holding plain (possibly nested) state dicts, only ever opened with
`torch.load(weights_only=True)`: loaded whole, each float tensor converted to float32 only when asked for."""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from ..errors import BadInput, first_line
from . import untrusted
from .source import Deferred, Reader, TensorSource, float32

CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _load(path: Path) -> object:
    """torch.load without code execution; a refused global is named, other failures are one line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notices are not the user's concern
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported (?:global|class):? (?:GLOBAL )?([\w.]+)", str(e))
        if found:
            raise BadInput(f"{path}: not a plain state dict (refusing to unpickle arbitrary objects such as "
                           f"{found.group(1)})") from e
        raise BadInput(f"{path}: corrupt checkpoint or not a plain state dict") from e
    except Exception as e:  # zip errors, truncation, unknown storage types, allocations refused
        raise BadInput(f"{path}: corrupt or truncated checkpoint ({first_line(e)})") from e


def open_checkpoint(path: Path) -> TensorSource:
    """Checks before loading (zip members: `untrusted.check_zip`) and after (strides:
    `untrusted.check_strides`); legacy (non-zip) checkpoints need no check before: torch reads their
    storages from the file as it goes, so a declared size beyond the file fails without the memory
    (a 4 GiB storage declared in a 4 MB file: refused at 0.3 GB).

    Tensors are converted one per request: they may share one storage (tied weights, or a hostile
    file's thousand views of it), so converting them all up front could take many times the file's size.
    """
    if untrusted.read_head(path, 4) == b"PK\x03\x04":
        untrusted.check_zip(path, os.stat(path).st_size)
    obj = _load(path)
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
    return Deferred({k: tuple(t.shape) for k, t in out.items()}, lambda name: float32(out[name]))


READER = Reader(
    name="a PyTorch checkpoint",
    magic=lambda head: head.startswith(b"PK\x03\x04") or head[:1] == b"\x80",  # zip (torch.save) or legacy pickle
    open=open_checkpoint,
    folder_names=CHECKPOINT_SUFFIXES,
    folder_label="a checkpoint",
)
