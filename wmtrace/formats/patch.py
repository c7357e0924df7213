"""A buyer's patch: what its copy holds that the master's file does not, plus a manifest saying how
to rebuild the copy byte for byte (`wmtrace.pipeline.patches.materialize`).

A patch is a safetensors file (never pickle) named BUYER.wmpatch. Its manifest is JSON in the
metadata key `wmtrace.patch`; its tensors are, per changed tensor of the copy, one of
    t/NAME            the tensor as the copy holds it (dtype and shape of the copy), or
    r/NAME, v/NAME    the rows that differ (int64 indices, ascending) and their values, or
    x/NAME            the copy's bytes XOR the master's, split into byte planes (every element's
                      first byte, then every second byte, ...) and zlib-compressed,
whichever is smallest. The white-box mark moves every element of a carrier (MiniLM: 6 tensors of
384 x 384, all 884,736 elements changed), so rows never help there; XOR planes do, because a mark of
about 2% keeps each float's sign, exponent and top mantissa bits: MiniLM's carriers take 2.55 MB
instead of 3.54 MB (zlib level 6; lzma: 2.52 MB, several times slower). What remains, about 2.3
bytes per float32 element, is the mark's own entropy at the bit level: an exact copy costs at
least that much unless the mark is recomputed from the key. Everything else is the master's tensor,
converted to the copy's dtype where the copy is stored in another (fp16/bf16 masters).

The manifest is untrusted when read: names, dtypes, shapes, shard file names and the patch's own
tensors are checked against each other before a byte is produced, and shard names are single plain
file names (no '/', no '..'), so a patch cannot make `materialize` write outside its folder.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInput, CorruptFile
from .stream import TORCH, Entry, FileTensors, shard_groups, shard_name, tensors_chunks, write_atomic

VERSION = 1
KEY = "wmtrace.patch"
SUFFIX = ".wmpatch"
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*\.safetensors")
INDEX = "model.safetensors.index.json"


@dataclass
class Manifest:
    """How to rebuild one copy: its tensors in the copy's order, its shard files (empty: one file),
    the full copy's sha256 and size, and which tensors the patch holds ("whole", "rows" or "xor")."""

    master: str
    master_sha256: str
    buyer: str
    buyer_id: int
    entries: list[Entry]
    files: list[tuple[str, int]]  # shard file name, number of consecutive entries in it
    sha256: str
    size: int
    patched: dict[str, str]
    format: str = "safetensors"
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps({
            "version": self.version, "format": self.format, "master": self.master,
            "master_sha256": self.master_sha256, "buyer": self.buyer, "id": self.buyer_id,
            "sha256": self.sha256, "size": self.size,
            "tensors": [[e.name, e.dtype, list(e.shape)] for e in self.entries],
            "files": [[n, c] for n, c in self.files], "patched": self.patched,
        }, separators=(",", ":"))

    def groups(self) -> list[tuple[str, list[Entry]]]:
        """(file name, entries) per file of the copy; one unnamed group for a single-file copy."""
        if not self.files:
            return [("", self.entries)]
        out, start = [], 0
        for name, count in self.files:
            out.append((name, self.entries[start:start + count]))
            start += count
        return out


def shard_layout(entries: list[Entry], shards: int) -> list[tuple[str, int]]:
    """The shard files `save_sharded` would write for these entries ([] for one file)."""
    if shards <= 1:
        return []
    groups = shard_groups(entries, shards)
    return [(shard_name(i, len(groups)), len(g)) for i, g in enumerate(groups, start=1)]


def diff(copy: dict[str, torch.Tensor], master: FileTensors) -> dict[str, torch.Tensor]:
    """The patch's tensors: for each tensor of `copy` whose bytes differ from the master's (converted
    to the copy's dtype), the whole tensor or its changed rows, whichever takes fewer bytes."""
    out: dict[str, torch.Tensor] = {}
    for name, t in copy.items():
        t = t.detach().cpu().contiguous()
        e = Entry.of(name, t)
        known = master.entries.get(name)
        if known is None or known.shape != e.shape:
            out[f"t/{name}"] = t
            continue
        if not t.numel():
            continue
        ref = master.tensor(name).to(t.dtype).contiguous()
        ours = t.reshape(t.shape[0] if t.dim() else 1, -1).view(torch.uint8)
        rows = ours.ne(ref.reshape(ours.shape[0], -1).view(torch.uint8)).any(1).nonzero().flatten()
        if not len(rows):
            continue
        row_bytes = ours.shape[1]
        xor = xor_planes(ours.reshape(-1).numpy(), ref.reshape(-1).view(torch.uint8).numpy(), t.element_size())
        costs = {"whole": t.numel() * t.element_size(), "xor": len(xor),
                 "rows": len(rows) * (row_bytes + 8) if t.dim() >= 1 else float("inf")}
        best = min(costs, key=costs.get)
        if best == "rows":
            out[f"r/{name}"], out[f"v/{name}"] = rows.to(torch.int64), t[rows].contiguous()
        elif best == "xor":
            out[f"x/{name}"] = torch.frombuffer(bytearray(xor), dtype=torch.uint8)
        else:
            out[f"t/{name}"] = t
    return out


def xor_planes(ours: np.ndarray, theirs: np.ndarray, itemsize: int) -> bytes:
    """Two tensors' bytes (uint8, same length) XORed, byte planes first, compressed."""
    x = np.bitwise_xor(ours, theirs).reshape(-1, itemsize).T
    return zlib.compress(np.ascontiguousarray(x).tobytes(), 6)


def unxor_planes(base: np.ndarray, packed: bytes, itemsize: int) -> np.ndarray:
    """`base` (the master's bytes in the copy's dtype, uint8) with `xor_planes` undone: the copy's
    bytes. A stream that inflates to any other length than the tensor's is refused, never expanded."""
    d = zlib.decompressobj()
    try:
        raw = d.decompress(packed, len(base) + 1)
    except zlib.error as e:
        raise CorruptFile(f"XOR delta does not inflate ({e})") from e
    if len(raw) != len(base) or d.unconsumed_tail or not d.eof:
        raise CorruptFile(f"XOR delta inflates to other than the tensor's {len(base)} bytes")
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, -1).T
    return np.bitwise_xor(base, planes.reshape(-1))


def patched_kinds(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    kinds = {"t/": "whole", "r/": "rows", "x/": "xor"}
    return {k[2:]: kinds[k[:2]] for k in tensors if k[:2] in kinds}


def write(path: str | os.PathLike, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> int:
    """Write a patch atomically; returns its size in bytes."""
    write_atomic(path, tensors_chunks(tensors, {KEY: manifest.to_json()}), digest=False)
    return Path(path).stat().st_size


def read(path: str | os.PathLike) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """A patch's manifest and tensors, every claim checked (`CorruptFile` in one line otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: patch file missing")
    with FileTensors(path) as f:
        raw = f.metadata.get(KEY)
        if raw is None:
            raise CorruptFile(f"{path}: not a wmtrace patch (no {KEY!r} manifest)")
        tensors = {k: f.tensor(k) for k in f.entries}
    try:
        manifest = _manifest(json.loads(raw))
    except (ValueError, TypeError, KeyError) as e:
        raise CorruptFile(f"{path}: patch manifest unreadable ({e})") from e
    _check(path, manifest, tensors)
    return manifest, tensors


def _manifest(d: dict) -> Manifest:
    if int(d["version"]) > VERSION:
        raise ValueError(f"patch format version {d['version']} is newer than this wmtrace reads ({VERSION})")
    entries = []
    for name, dtype, shape in d["tensors"]:
        if not isinstance(name, str) or dtype not in TORCH or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ValueError(f"tensor entry {name!r}")
        entries.append(Entry(name, dtype, tuple(shape)))
    files = [(str(n), int(c)) for n, c in d["files"]]
    digest = str(d["sha256"])
    if not re.fullmatch(r"[0-9a-f]{64}", digest) or not isinstance(d["size"], int):
        raise ValueError("sha256 or size")
    return Manifest(str(d["master"]), str(d["master_sha256"]), str(d["buyer"]), int(d["id"]), entries, files,
                    digest, int(d["size"]), {str(k): str(v) for k, v in dict(d["patched"]).items()},
                    str(d["format"]), int(d["version"]))


def _check(path: Path, m: Manifest, tensors: dict[str, torch.Tensor]) -> None:
    """The manifest against itself and the patch's tensors; shard names against path tricks."""
    if m.format != "safetensors":
        raise CorruptFile(f"{path}: patch of a {m.format!r} copy; only safetensors copies are patched")
    by_name = {e.name: e for e in m.entries}
    if len(by_name) != len(m.entries):
        raise CorruptFile(f"{path}: patch manifest names a tensor twice")
    names = [n for n, _ in m.files]
    for n in names:
        if not SHARD_NAME.fullmatch(n) or ".." in n or n == INDEX:
            raise CorruptFile(f"{path}: patch manifest names shard file {n!r}: not a plain file name")
    if len(set(names)) != len(names) or (m.files and (sum(c for _, c in m.files) != len(m.entries)
                                                       or min(c for _, c in m.files) < 1)):
        raise CorruptFile(f"{path}: patch manifest's shard layout does not cover its tensors once each")
    expected = set()
    for name, kind in m.patched.items():
        e = by_name.get(name)
        if e is None or kind not in ("whole", "rows", "xor"):
            raise CorruptFile(f"{path}: patch holds {name!r} ({kind}), which its manifest does not declare")
        if kind == "whole":
            expected.add(f"t/{name}")
            _expect(path, tensors.get(f"t/{name}"), e.dtype, e.shape, name)
            continue
        if kind == "xor":
            expected.add(f"x/{name}")
            x = tensors.get(f"x/{name}")
            if x is None or x.dtype != torch.uint8 or x.dim() != 1:
                raise CorruptFile(f"{path}: patch XOR delta of {name!r} missing or malformed")
            continue
        expected |= {f"r/{name}", f"v/{name}"}
        rows = tensors.get(f"r/{name}")
        if rows is None or rows.dtype != torch.int64 or rows.dim() != 1 or not e.shape:
            raise CorruptFile(f"{path}: patch rows of {name!r} missing or malformed")
        ordered = bool((rows[1:] > rows[:-1]).all())
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= e.shape[0] or not ordered):
            raise CorruptFile(f"{path}: patch rows of {name!r} out of range or out of order")
        _expect(path, tensors.get(f"v/{name}"), e.dtype, (len(rows), *e.shape[1:]), name)
    if set(tensors) != expected:
        raise CorruptFile(f"{path}: patch holds tensors its manifest does not declare")


def _expect(path: Path, t: torch.Tensor | None, dtype: str, shape: tuple[int, ...], name: str) -> None:
    if t is None or t.dtype != TORCH[dtype] or tuple(t.shape) != tuple(shape):
        raise CorruptFile(f"{path}: patch values of {name!r} missing or not {dtype} {list(shape)}")
