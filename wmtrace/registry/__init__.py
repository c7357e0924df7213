"""The seller's registry: masters, their keys, buyers, issued files and an audit log.

`store` alone knows the folder layout (keys, master copies, the database file, the lock);
`sqlite` is the database; `records` the rows it hands out; `backup` copies the folder out and back.
"""

from .records import Buyer, Master
from .sqlite import Registry
from .store import DB_NAME, default_path

__all__ = ["DB_NAME", "Buyer", "Master", "Registry", "default_path"]
