"""Where a database-backed registry keeps master files: a local (or shared) folder, or an fsspec URL.

The rest of wmtrace reads local paths (`weights_path`, `moments_path`, ...). A folder is used as it is;
any other URL (`s3://`, `gs://`, `memory://`, ...) is mirrored into a local cache folder: a master's
files are uploaded when it is registered and fetched on first use, the weights checked against the
sha256 in the master's row, so a file altered in the bucket is refused, not used to accuse anyone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import BadInput
from .location import is_url, mask
from .store import Layout


def cache_root(url: str) -> Path:
    """The local mirror of a remote storage URL: $WMTRACE_CACHE/<hash of the URL> (~/.cache/wmtrace)."""
    base = Path(os.environ.get("WMTRACE_CACHE") or Path.home() / ".cache" / "wmtrace")
    return base / "storage" / hashlib.sha256(url.encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Storage:
    """A registry's master files. `root` is always a local folder (the storage itself, or its mirror)."""

    def __init__(self, url: str):
        self.url = url
        local = url.removeprefix("file://") if url.startswith("file://") else (None if is_url(url) else url)
        if local is not None:
            self.fs, self.base, self.root = None, None, Path(local).absolute()
        else:
            import fsspec

            try:
                self.fs, self.base = fsspec.core.url_to_fs(url)
            except (ImportError, ValueError) as e:
                raise BadInput(f"storage {mask(url)}: not usable ({e})") from e
            self.root = cache_root(url)
        self.layout = Layout(self.root)

    def __str__(self) -> str:
        return mask(self.url)

    def prepare(self) -> None:
        for folder in (self.root, self.layout.masters, self.layout.cache):
            try:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as e:
                raise BadInput(f"{folder}: cannot create the registry's storage ({e.strerror})") from e

    def _remote(self, path: Path) -> str:
        return f"{self.base.rstrip('/')}/{path.relative_to(self.root).as_posix()}"

    def upload(self, paths: list[Path]) -> None:
        """Copy local files (under `root`) to a remote storage; nothing to do for a folder."""
        if self.fs is None:
            return
        for p in paths:
            if p.exists():
                try:
                    self.fs.put_file(str(p), self._remote(p))
                except Exception as e:  # noqa: BLE001 - any backend's failure is one line
                    raise BadInput(f"storage {self}: cannot upload {p.name} ({e})") from e

    def fetch(self, path: Path, sha256: str | None = None) -> Path:
        """`path` (under `root`), downloaded from a remote storage when not mirrored yet; with `sha256`,
        a download that does not match is refused. A file the storage lacks is left absent."""
        if self.fs is None or path.exists():
            return path
        remote = self._remote(path)
        if not self.fs.exists(remote):
            return path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self.fs.get_file(remote, str(tmp))
            if sha256 is not None and sha256_file(tmp) != sha256:
                raise BadInput(f"storage {self}: {path.name} differs from the registered sha256; it was altered")
            os.replace(tmp, path)
        except BadInput:
            raise
        except Exception as e:  # noqa: BLE001
            raise BadInput(f"storage {self}: cannot fetch {path.name} ({e})") from e
        finally:
            tmp.unlink(missing_ok=True)
        return path
