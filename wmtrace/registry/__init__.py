"""The seller's registry: masters, their keys, buyers, issued files and an audit log.

`store` alone knows the folder layout (keys, master copies, the database file, the lock);
`base` is what a backend implements, `sqlite` the first one; `records` the rows it hands out;
`backup` copies the folder out and back.
"""

from .base import RegistryBackend
from .records import CONFIG_VERSION, Buyer, Master, MasterConfig
from .sqlite import Registry
from .store import DB_NAME, default_path

__all__ = [
    "CONFIG_VERSION", "DB_NAME", "Buyer", "Master", "MasterConfig", "Registry", "RegistryBackend", "default_path",
]
