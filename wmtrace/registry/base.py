"""What a registry backend implements: `sqlite.Registry` (a folder, keys in 0600 files) and
`postgres.Registry` (a shared database, keys sealed under the operator's key-encryption key).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import numpy as np

from .records import Buyer, Master


class RegistryBackend(Protocol):
    root: Path  # the local folder holding master files (for a remote storage, its mirror)
    location: str  # the registry as shown to users: a folder, or a URL without its password

    # Keys: checked against the fingerprint registered with the master.
    def key(self, master: str) -> bytes: ...
    def has_key(self, master: str) -> bool: ...
    def store_key(self, master: str, key: bytes) -> None:
        """Keep a new master's key; never overwrites one (BadInput when one is stored)."""

    # Files (`store.Paths`): master weights, stored tensors.
    def weights_path(self, master: str) -> Path: ...
    def moments_path(self, weights: Path) -> Path: ...
    def template_path(self, weights: Path) -> Path: ...
    def cache_path(self, name: str) -> Path: ...
    def stored(self, m: Master) -> dict[str, np.ndarray]: ...

    # Records.
    def lock(self) -> AbstractContextManager[None]:
        """Registry-wide, held while a master is registered; re-entrant within one object."""

    def fingerprint(self, master: str) -> str | None: ...
    def add_master(self, m: Master) -> None: ...
    def masters(self) -> list[Master]: ...
    def master(self, name: str | None = None) -> Master: ...
    def buyers(self, master: str | None = None, status: str | None = "issued") -> list[Buyer]: ...
    def buyer(self, master: str, buyer_id: int) -> Buyer | None: ...
    def issued_ids(self, master: str) -> np.ndarray:
        """IDs of the master's issued buyers, sorted (int64): what `trace` scores, without a record each."""

    def reserve(self, master: str, names: list[str | None]) -> list[Buyer]:
        """One new ID per name, atomically across processes; reservations of dead processes first."""

    def complete(self, b: Buyer) -> None: ...
    def release(self, master: str, ids: list[int]) -> None: ...
    def log_trace(self, file: str, verdict: str, master: str | None, buyer: int | None,
                  colluders: list[int] | None = None) -> None: ...
    def log_query(self, target: str, reveal: str, queries: int, verdict: str, master: str | None,
                  buyer: int | None, colluders: list[int] | None = None) -> None: ...
    def audit_log(self, limit: int = 100) -> list[dict]: ...
    def import_records(self, buyers: list[Buyer], audit: list[dict]) -> None:
        """Copy buyers (any status) and audit entries (oldest first) from another registry
        (`registry migrate`); reservations arrive without an owner, so the next `reserve` takes them."""

    def close(self) -> None: ...


def _conforms(backend: type) -> Iterator[str]:
    """Names of the protocol's methods that `backend` lacks (tests/test_registry.py checks none)."""
    for name in dir(RegistryBackend):
        if not name.startswith("_") and name not in ("root", "location") and not callable(getattr(backend, name, None)):
            yield name
