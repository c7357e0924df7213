"""What `verify` re-runs the extraction against: the part of a registry `trace.trace_tensors` reads, built
from an evidence bundle's revealed material alone (one master, its key and carriers, the issued IDs the
bound counts, the accused buyers' names)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from ..errors import BadInput
from ..registry import Buyer, Master, MasterConfig


class Revealed:
    def __init__(self, reveal: dict, key: bytes, names: dict[int, str], carriers: Path, stored: Path | None,
                 cache: Path):
        self.location, self._key, self._cache, self._names = "an evidence bundle", key, cache, names
        self._ids = np.array(sorted(int(i) for i in reveal["issued_ids"]), dtype=np.int64)
        self._stored = {k: v.astype(np.float64) for k, v in load_file(str(stored)).items()} if stored else {}
        self._master = Master(reveal["master"], carriers, reveal["weights_sha256"], "", None,
                              MasterConfig.from_json(reveal["config"], reveal["master"]), "", None)

    def masters(self) -> list[Master]:
        return [self._master]

    def master(self, name: str | None = None) -> Master:
        if name not in (None, self._master.name):
            raise BadInput(f"the bundle reveals master {self._master.name!r}, not {name!r}")
        return self._master

    def key(self, master: str) -> bytes:
        return self._key

    def stored(self, m: Master) -> dict[str, np.ndarray]:
        return self._stored

    def issued_ids(self, master: str) -> np.ndarray:
        return self._ids

    def buyer(self, master: str, buyer_id: int) -> Buyer | None:
        return Buyer(master, buyer_id, self._names.get(buyer_id, f"buyer {buyer_id}"), "issued")

    def cache_path(self, name: str) -> Path:
        return self._cache / name
