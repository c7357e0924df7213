"""Per-buyer patches: `issue --store patch` keeps what a copy holds beyond the master's file, and
`materialize` rebuilds the full copy from the master's file (read range by range) plus the patch,
the same bytes a full issue writes (both go through `formats.stream`), checked against the sha256
registered for the buyer before anything is handed over.

A copy's sha256 is computed at issue time from the copy in memory streamed through the writer, so
the full copy is never written; `formats.patch.diff` compares the copy with the master's file byte
for byte, so master + patch gives back exactly those bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from .. import modelio
from ..errors import BadArgument, BadInput, CorruptFile
from ..formats import patch, stream
from ..formats.stream import Entry, FileTensors
from ..formats.write import atomic_folder
from ..registry import Buyer, Master, Registry

STORES = ("full", "patch")
Part = tuple[str, Callable[[], Iterable]]  # a file of the copy ("" for a single file) and its bytes


def check_store(store: str, m: Master | None = None) -> None:
    """Refuse an unknown store, and patches of a GGUF master: `save_gguf` quantizes a copy as a whole
    (block scales over the marked weights), so its bytes cannot be streamed from the master's file
    plus a patch; such copies are issued whole."""
    if store not in STORES:
        raise BadArgument("store", f"must be one of {', '.join(STORES)}, not {store!r}")
    if store == "patch" and m is not None and m.config.format != "safetensors":
        raise BadInput(f"master {m.name!r} is a {m.config.format.upper()} master: its copies are written whole "
                       "(--store full), patches need a safetensors master")


def parts(files: list[tuple[str, list[Entry]]], read: Callable[[Entry], Iterable]) -> list[Part]:
    """The copy's files in the order `modelio.sha256_file` hashes them: one file, or the shards and
    their index json sorted by name."""
    if len(files) == 1 and not files[0][0]:
        return [("", lambda: stream.chunks(files[0][1], read))]
    out: list[Part] = [(name, lambda g=group: stream.chunks(g, read)) for name, group in files]
    index = stream.index_json(files)
    out.append((patch.INDEX, lambda: [index]))
    return sorted(out, key=lambda p: p[0])


def digest(copy_parts: list[Part]) -> tuple[str, int]:
    """sha256 (as `modelio.sha256_file` computes it) and byte size of a copy, from its bytes alone."""
    h, size = hashlib.sha256(), 0
    for name, pieces in copy_parts:
        if name:
            h.update(name.encode() + b"\0")
        for piece in pieces():
            h.update(stream.data(piece))
            size += len(piece)
    return h.hexdigest(), size


class Patcher:
    """What every patch of one issuing run shares: the master's file, opened (memory-mapped) once."""

    def __init__(self, m: Master):
        check_store("patch", m)
        self.m = m
        self.master = FileTensors(m.weights)

    def save(self, b: Buyer, copy: dict[str, torch.Tensor], out: Path) -> tuple[Path, str]:
        """Write BUYER.wmpatch for the copy `copy` (the tensors a full issue would write, in its order);
        returns the patch's path and the full copy's sha256."""
        entries = [Entry.of(k, v) for k, v in copy.items()]
        files = patch.shard_layout(entries, self.m.config.shards)
        manifest = patch.Manifest(self.m.name, self.m.weights_sha256, b.name, b.id, entries, files, "", 0, {})
        sha, size = digest(parts(manifest.groups(), lambda e: stream.tensor_chunks(copy[e.name])))
        tensors = patch.diff(copy, self.master)
        manifest.sha256, manifest.size, manifest.patched = sha, size, patch.patched_kinds(tensors)
        path = out / f"{b.name}{patch.SUFFIX}"
        patch.write(path, manifest, tensors)
        return path, sha

    def close(self) -> None:
        self.master.close()


def find_buyer(reg: Registry, buyer: str | int, master: str | None = None) -> Buyer:
    """An issued buyer by name (or by id when no name matches), of `master` or of any master."""
    found = [b for b in reg.buyers(master) if b.name == str(buyer)]
    if not found and str(buyer).isdigit():
        found = [b for b in reg.buyers(master) if b.id == int(buyer)]
    if not found:
        where = f" of master {master!r}" if master else ""
        raise BadInput(f"no issued buyer {buyer!r}{where}")
    if len(found) > 1:
        raise BadInput(f"buyer {buyer!r} was issued by {len(found)} masters: give --master")
    return found[0]


class Source:
    """A patched copy ready to stream: the registered buyer, master and patch, checked against each
    other before any byte is produced."""

    def __init__(self, reg: Registry, buyer: str | int, master: str | None = None):
        b = find_buyer(reg, buyer, master)
        if not b.file or not b.file.endswith(patch.SUFFIX):
            raise BadInput(f"buyer {b.name!r} was issued whole ({b.file}): nothing to materialize, copy that file")
        m = reg.master(b.master)
        self.buyer, self.master_row = b, m
        self.manifest, self.tensors = patch.read(b.file)
        mf = self.manifest
        if (mf.master, mf.buyer, mf.buyer_id, mf.sha256) != (m.name, b.name, b.id, b.sha256):
            raise CorruptFile(f"{b.file}: patch does not belong to buyer {b.name!r} of master {m.name!r} "
                              "(its manifest names another buyer, master or copy)")
        if mf.master_sha256 != m.weights_sha256:
            raise BadInput(f"{b.file}: patch was made against other weights of master {m.name!r} than those "
                           "registered")
        self.master = FileTensors(m.weights)
        for e in mf.entries:
            known = self.master.entries.get(e.name)
            if mf.patched.get(e.name) != "whole" and (known is None or known.shape != e.shape):
                self.master.close()
                raise BadInput(f"{m.weights}: the master's file no longer holds {e.name!r} as buyer {b.name!r}'s "
                               "patch expects: the master's weights changed since registration")
        self.parts = parts(mf.groups(), self._read)
        self.sharded = bool(mf.files)

    def _read(self, e: Entry) -> Iterator:
        kind = self.manifest.patched.get(e.name)
        if kind == "whole":
            return stream.tensor_chunks(self.tensors[f"t/{e.name}"])
        if kind == "rows":
            base = self.master.tensor(e.name).to(stream.TORCH[e.dtype]).contiguous()
            base[self.tensors[f"r/{e.name}"]] = self.tensors[f"v/{e.name}"]
            return stream.tensor_chunks(base)
        if kind == "xor":
            base = self.master.tensor(e.name).to(stream.TORCH[e.dtype]).contiguous().reshape(-1).view(torch.uint8)
            try:
                raw = patch.unxor_planes(base.numpy(), self.tensors[f"x/{e.name}"].numpy().tobytes(),
                                         stream.SIZES[e.dtype])
            except CorruptFile as err:
                raise CorruptFile(f"{self.buyer.file}: tensor {e.name!r}: {err}") from err
            return iter([memoryview(raw)])
        return self.master.converted(e.name, e.dtype)

    def verify(self, sha: str) -> None:
        """Raise unless `sha` is the registered sha256; say whether the master's file changed."""
        if sha == self.buyer.sha256:
            return
        m = self.master_row
        if modelio.sha256_file(m.weights) != m.weights_sha256:
            raise BadInput(f"{m.weights}: the master's weights changed since registration (sha256 differs from "
                           f"the registered one); buyer {self.buyer.name!r}'s copy cannot be rebuilt")
        raise CorruptFile(f"{self.buyer.file}: the copy rebuilt from this patch has sha256 {sha[:16]}..., not the "
                          f"registered {self.buyer.sha256[:16]}...: the patch was altered")

    def close(self) -> None:
        self.master.close()


def materialize(reg: Registry, buyer: str | int, out: str | os.PathLike, master: str | None = None) -> dict:
    """Write buyer's full copy to `out` (a file; a folder for a sharded master), atomically, checked
    against the registered sha256 before it is renamed into place: on any mismatch nothing is left."""
    src = Source(reg, buyer, master)
    out = Path(out)
    try:
        if out.exists():
            raise BadInput(f"{out}: already exists")
        if not src.sharded:
            sha = stream.write_atomic(out, src.parts[0][1](), check=lambda s, n: src.verify(s))
        else:
            sha = _write_folder(src, out)
    finally:
        src.close()
    return {"buyer": src.buyer.public(), "file": str(out.resolve()), "sha256": sha, "bytes": src.manifest.size,
            "patch_bytes": Path(src.buyer.file).stat().st_size}


def _write_folder(src: Source, out: Path) -> str:
    """A sharded copy: each file written into a hidden folder beside `out` and fsynced, the folder's
    sha256 checked, then renamed into place."""
    h = hashlib.sha256()
    with atomic_folder(out) as tmp:
        for name, pieces in src.parts:
            h.update(name.encode() + b"\0")
            with open(tmp / name, "wb") as f:
                for piece in pieces():
                    stream.put(f, piece, h)
                f.flush()
                os.fsync(f.fileno())
        src.verify(h.hexdigest())
    return h.hexdigest()


def materialize_stream(reg: Registry, buyer: str | int, master: str | None = None) -> tuple[int, Iterator[bytes]]:
    """(size, chunks) of buyer's full copy, for a download server: the sha256 is checked as the bytes
    go, and the iterator raises at its end if it differs from the registered one. A server must not
    treat the download as complete (send the last chunk, or close the response cleanly) until the
    iterator has finished without raising. Single-file copies only: a sharded copy is a folder
    (`materialize`)."""
    src = Source(reg, buyer, master)
    if src.sharded:
        src.close()
        raise BadInput(f"buyer {src.buyer.name!r}'s copy is a sharded folder: use materialize to a folder")

    def chunks() -> Iterator[bytes]:
        h = hashlib.sha256()
        try:
            for piece in src.parts[0][1]():
                piece = bytes(stream.data(piece))
                h.update(piece)
                yield piece
            src.verify(h.hexdigest())
        finally:
            src.close()

    return src.manifest.size, chunks()
