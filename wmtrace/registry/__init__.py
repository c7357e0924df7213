"""The seller's registry: masters, their keys, buyers, issued files and an audit log.

`open` picks the backend from where the registry is: a PostgreSQL URL (`postgres`: shared by many
hosts, keys sealed by `keystore`, master files in a `storage`), or a folder (`sqlite`, whose layout
`store` alone knows). `base` is what a backend implements, `records` the rows it hands out; `backup`
copies a folder out and back, `migrate` copies a registry from one backend to another.
"""

from __future__ import annotations

import os

from .base import RegistryBackend
from .location import default_location, is_postgres, mask
from .records import CONFIG_VERSION, Buyer, Master, MasterConfig
from .sqlite import Registry
from .store import DB_NAME, default_path

__all__ = [
    "CONFIG_VERSION", "DB_NAME", "Buyer", "Master", "MasterConfig", "Registry", "RegistryBackend", "default_path",
    "is_postgres", "mask", "open",
]


def open(location: str | os.PathLike | None = None, create: bool = False,  # noqa: A001 - registry.open(url)
         storage: str | None = None) -> RegistryBackend:
    """The registry at `location` ($WMTRACE_REGISTRY or ./registry): `postgresql://` or `postgres://` a
    database (`storage`: where a new one keeps master files), anything else a SQLite folder."""
    location = default_location() if location is None else location
    if is_postgres(str(location)):
        from .postgres import Registry as Postgres

        return Postgres(str(location), create=create, storage=storage)
    return Registry(location, create=create)
