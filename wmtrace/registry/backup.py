"""Backup and restore of a registry folder: the key files are the one thing that must never be lost.

A master's key is generated once and exists nowhere else; without it no issued copy can ever be
traced again. A backup therefore holds what tracing needs (the database, `keys/`, `masters/`; not
the rebuildable `cache/` nor the lock) and is checked before it is handed over: each master's key
matches its registered fingerprint and its weights their registered sha256. The seller's signing key
(`seller.key`) is kept the same way: lost, the registry could no longer extend its signed audit log
nor sign statements as the seller buyers and arbiters know; it must be the key the chain started with.

Both directions write into a hidden sibling of the destination and rename it into place at the
end, so the destination either does not exist (or is still empty) or is complete, and a key is
never overwritten. `backup.json` records sha256s and fingerprints, never key bytes: it catches
damage and mix-ups on restore; it is not a signature against someone who can rewrite the backup.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..coding import keys
from ..errors import BadInput, WmtraceError
from ..evidence import chain
from ..evidence.signing import SigningKey
from .sqlite import Registry
from .storage import sha256_file
from .store import DB_NAME, KEYS, MASTERS, SELLER_KEY, Layout

MANIFEST = "backup.json"
FORMAT = "wmtrace-registry-backup"
VERSION = 1


def _sha256_copy(src: Path, dest: Path) -> tuple[str, int]:
    """Copy one file to a new 0600 file (never replacing one), synced; sha256 and size of what was read."""
    h, size = hashlib.sha256(), 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with open(src, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return h.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _secret_files(layout: Layout) -> list[str]:
    """Relative paths of the key and master files (hidden temporaries of interrupted writes left out)."""
    found = []
    for folder in (KEYS, MASTERS):
        base = layout.root / folder
        if base.is_dir():
            found += [f"{folder}/{p.name}" for p in sorted(base.iterdir())
                      if not p.name.startswith(".") and p.is_file()]
    return found + ([SELLER_KEY] if layout.seller.is_file() else [])


def _check_empty_target(path: Path, what: str) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise BadInput(f"{path}: {what} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        raise BadInput(f"{path}: {what} exists and is not empty; give a new or empty folder")


@contextmanager
def _staging(dest: Path, tag: str) -> Iterator[Path]:
    """A private 0700 sibling of `dest`, renamed onto it on success (rename replaces only an empty
    folder, atomically) and removed on failure: `dest` is never seen half-written."""
    try:
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{tag}-{os.getpid()}"
        if tmp.exists():  # left by a killed run of this very pid number: ours to clear
            shutil.rmtree(tmp)
        tmp.mkdir(mode=0o700)
        os.chmod(tmp, 0o700)
        for sub in (KEYS, MASTERS):
            (tmp / sub).mkdir(mode=0o700)
            os.chmod(tmp / sub, 0o700)
    except OSError as e:
        raise BadInput(f"{dest}: cannot write there ({e.strerror})") from e
    try:
        yield tmp
        for sub in (KEYS, MASTERS, "."):
            _fsync_dir(tmp / sub)
        try:
            os.rename(tmp, dest)
        except OSError as e:
            raise BadInput(f"{dest}: cannot move the finished copy into place; {dest} was filled meanwhile? "
                           f"({e.strerror})") from e
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_seller(reg: Registry, files: dict[str, str], want: str | None = None) -> str | None:
    """The fingerprint of the copy's seller key (None: it has none), which must be the key its audit chain
    started with and, on restore, the manifest's (`want`); a chain without its key is an incomplete copy."""
    start = reg._rows("SELECT detail FROM audit WHERE action = ? ORDER BY seq LIMIT 1", (chain.START,))
    if SELLER_KEY not in files:
        if start:
            raise BadInput(f"the registry signs its audit log but the copy has no {SELLER_KEY}; the backup is "
                           "incomplete")
        return None
    public = SigningKey(keys.read(reg.root / SELLER_KEY)).public
    if start and json.loads(start[0]["detail"]).get("public_key") != public.raw.hex():
        raise BadInput(f"{SELLER_KEY}: not the key the registry's audit log was started with; the key was replaced")
    if want is not None and want != public.fingerprint:
        raise BadInput(f"{SELLER_KEY}: fingerprint {public.fingerprint} differs from the backup manifest's ({want}); "
                       "the key was replaced")
    return public.fingerprint


def _verify(root: Path, files: dict[str, str], masters: dict[str, str] | None = None,
            seller: str | None = None) -> dict:
    """Check a copied registry in `root`: the database opens as a registry, every registered master's
    key matches its fingerprint (and `masters`, the manifest's) and its weights their sha256, the seller
    key is the chain's (and `seller`, the manifest's), and every file its sha256 in `files`. Returns the
    masters, the seller key's fingerprint and buyer counts found."""
    if files.get(DB_NAME) is None or sha256_file(root / DB_NAME) != files[DB_NAME]:
        raise BadInput(f"{root / DB_NAME}: sha256 differs from the backup manifest; the database was altered")
    try:
        reg = Registry(root)
    except WmtraceError as e:
        raise BadInput(f"{root / DB_NAME}: not a usable registry database ({e})") from e
    try:
        found, checked = [], {DB_NAME}
        fingerprint = _check_seller(reg, files, seller)
        for m in reg.masters():
            key_rel = f"{KEYS}/{m.name}.key"
            if key_rel not in files:
                raise BadInput(f"master {m.name!r} has no key file {key_rel} in the copy; the backup is incomplete")
            fp = keys.fingerprint(keys.read(root / key_rel))
            if fp != m.key_fingerprint or (masters is not None and masters.get(m.name) != fp):
                raise BadInput(f"{key_rel}: key fingerprint {fp} differs from the one registered for master "
                               f"{m.name!r} ({m.key_fingerprint}); the key was replaced")
            try:
                weights_rel = m.weights.relative_to(root).as_posix()
            except ValueError:
                raise BadInput(f"master {m.name!r}: weights {m.weights} lie outside the registry") from None
            if weights_rel not in files or sha256_file(root / weights_rel) != m.weights_sha256:
                raise BadInput(f"{weights_rel}: missing or sha256 differs from the registered weights of master "
                               f"{m.name!r}; the weights were altered")
            checked |= {key_rel, weights_rel}
            found.append({"name": m.name, "key_fingerprint": fp, "weights_sha256": m.weights_sha256,
                          "buyers": len(reg.buyers(m.name))})
        if masters is not None and set(masters) != {m["name"] for m in found}:
            raise BadInput(f"{root}: the database's masters differ from the backup manifest's")
        for rel in sorted(set(files) - checked):
            if sha256_file(root / rel) != files[rel]:
                raise BadInput(f"{rel}: sha256 differs from the backup manifest; the file was altered")
        return {"masters": found, "seller": fingerprint, "buyers": len(reg.buyers()),
                "reserved": len(reg.buyers(status="reserved"))}
    finally:
        reg.close()


def _file_rows(root: Path, files: dict[str, str]) -> list[dict]:
    return [{"path": rel, "size": (root / rel).stat().st_size, "sha256": sha} for rel, sha in sorted(files.items())]


def backup(reg: Registry, dest: str | os.PathLike) -> dict:
    """Copy the registry's database, keys and masters into `dest` (new or empty), verified.

    Taken under the registry lock, so no master is half-registered; the database is copied with
    SQLite's online backup, one read transaction, so buyers issued meanwhile are wholly in or out."""
    dest = Path(dest).absolute()
    if reg.conn is None:
        raise BadInput(f"no wmtrace registry at {reg.root} to back up")
    if dest.resolve().is_relative_to(reg.root.resolve()):
        raise BadInput(f"{dest}: a backup inside the registry it copies protects nothing; choose another place")
    _check_empty_target(dest, "backup folder")
    files: dict[str, str] = {}
    with reg.lock(), _staging(dest, "backup") as tmp:
        try:
            fd = os.open(tmp / DB_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            copy = sqlite3.connect(tmp / DB_NAME)
            try:
                reg.conn.backup(copy)
            finally:
                copy.close()
            for rel in _secret_files(reg.layout):
                files[rel], _ = _sha256_copy(reg.root / rel, tmp / rel)
        except (OSError, sqlite3.Error) as e:
            raise BadInput(f"{dest}: cannot write the backup ({getattr(e, 'strerror', None) or e})") from e
        Registry(tmp).close()  # brings an older schema up to date now, so the hash below stays true
        files[DB_NAME] = sha256_file(tmp / DB_NAME)
        found = _verify(tmp, files)
        info = {"format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "registry": str(reg.root), **found, "files": _file_rows(tmp, files)}
        fd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    return {"backup": str(dest), **info, "bytes": sum(r["size"] for r in info["files"])}


def _read_manifest(src: Path) -> dict:
    try:
        info = json.loads((src / MANIFEST).read_text())
        files = {r["path"]: r["sha256"] for r in info["files"]}
        masters = {m["name"]: m["key_fingerprint"] for m in info["masters"]}
        seller = info.get("seller")  # absent from backups made before the seller key
    except FileNotFoundError:
        raise BadInput(f"{src}: not a wmtrace registry backup (no {MANIFEST})") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{src / MANIFEST}: unreadable backup manifest ({e})") from e
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise BadInput(f"{src / MANIFEST}: not a wmtrace registry backup of version {VERSION}")
    for rel in files:  # only the registry's own files, one level down: nothing escapes the target
        folder, _, name = rel.rpartition("/")
        if not (rel in (DB_NAME, SELLER_KEY) or (folder in (KEYS, MASTERS) and name and not name.startswith("."))):
            raise BadInput(f"{src / MANIFEST}: unexpected file {rel!r} in the manifest")
    present = set(_secret_files(Layout(src))) | ({DB_NAME} if (src / DB_NAME).is_file() else set())
    if present - set(files):
        raise BadInput(f"{src / sorted(present - set(files))[0]}: not in the backup manifest; the backup was altered")
    if set(files) - present:
        raise BadInput(f"{src / sorted(set(files) - present)[0]}: missing from the backup")
    return {"created": info.get("created"), "files": files, "masters": masters, "seller": seller}


def restore(src: str | os.PathLike, root: str | os.PathLike) -> dict:
    """Install the backup in `src` as the registry `root`, which must not hold a registry (nor anything).

    The copy is verified (manifest sha256s, key fingerprints, registered weights, schema) before it is
    renamed into place; on any failure `root` is left as it was."""
    src, root = Path(src).absolute(), Path(root).absolute()
    if not src.is_dir():
        raise BadInput(f"{src}: no such backup folder")
    manifest = _read_manifest(src)
    target = Layout(root)
    held = ([target.db] if target.db.exists() else []) + (target.secrets_present() if root.is_dir() else [])
    if held:
        raise BadInput(f"{root} already holds a registry ({held[0].relative_to(root)}); restore never overwrites "
                       "a key: restore into a new folder")
    _check_empty_target(root, "registry folder")
    with _staging(root, "restore") as tmp:
        try:
            for rel in manifest["files"]:
                _sha256_copy(src / rel, tmp / rel)
        except OSError as e:
            raise BadInput(f"{root}: cannot copy the backup ({e.strerror})") from e
        found = _verify(tmp, manifest["files"], manifest["masters"], manifest["seller"])
        rows = _file_rows(tmp, manifest["files"])
    return {"registry": str(root), "source": str(src), "created": manifest["created"], **found,
            "files": rows, "bytes": sum(r["size"] for r in rows)}
