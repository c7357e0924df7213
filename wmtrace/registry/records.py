"""What the registry records: a registered master (with its typed configuration) and a buyer copy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..coding.codes import CodeSpec
from ..errors import BadInput, UnknownMaster

# Version 1 (0.1.0): one white-box scheme, its "carriers" and "embed" at the top level.
# Version 2: every scheme's settings under "schemes", by scheme name.
# Version 3 (0.6.0): the master's file format and, for GGUF, each tensor's type ("quants").
CONFIG_VERSION = 3


@dataclass(frozen=True)
class MasterConfig:
    """How a master was registered. The registry parses only what every scheme shares; each scheme
    parses its own entry of `schemes` (`wmtrace.schemes.whitebox.Config.of`)."""

    code: CodeSpec
    schemes: dict[str, dict]
    eval_samples: int | None = None  # held-out samples for each copy's fidelity (None: all)
    dtypes: dict[str, str] = field(default_factory=dict)  # stored dtypes of the master, where not float32
    shards: int = 1  # copies are written in as many shards as the master came in
    output: str = "logits"  # what the model returns, "logits" or "embedding": how fidelity is measured
    version: int = CONFIG_VERSION
    # Least top-1 agreement (cosine, for encoders) a copy may have on the held-out split; `issue`
    # writes no copy below it. None: no gate (masters registered before 0.4, or `--fidelity 0`).
    fidelity: float | None = None
    # The master's file format: copies are written in it ("safetensors", or "gguf" with each tensor in its
    # GGUF type in `quants`, by the tensor's name as read, in the file's order).
    format: str = "safetensors"
    quants: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict, master: str = "") -> MasterConfig:
        d = migrate(d, master)
        return cls(CodeSpec(**d["code"]), dict(d["schemes"]), d.get("eval_samples"), dict(d.get("dtypes", {})),
                   int(d.get("shards", 1)), d.get("output", "logits"), int(d["version"]), d.get("fidelity"),
                   d.get("format", "safetensors"), dict(d.get("quants", {})))

    def to_json(self) -> dict:
        return {"version": self.version, "code": {"symbols": self.code.symbols, "name": self.code.name},
                "schemes": self.schemes, "eval_samples": self.eval_samples, "dtypes": self.dtypes,
                "shards": self.shards, "output": self.output, "fidelity": self.fidelity, "format": self.format,
                "quants": self.quants}


def migrate(d: dict, master: str = "") -> dict:
    """A stored configuration brought to `CONFIG_VERSION`, without touching the stored row."""
    version = int(d.get("version", 1))
    if version > CONFIG_VERSION:
        raise BadInput(f"master {master!r} was registered by a newer wmtrace (configuration version {version})")
    if version == 1:
        d = {k: v for k, v in d.items() if k not in ("carriers", "embed")} | {
            "version": 2, "output": d["embed"].get("output", "logits"),
            "schemes": {"whitebox": {"carriers": d["carriers"], "embed": d["embed"]}}}
    if d["version"] == 2:  # every master before GGUF came from (and issues) safetensors
        d = d | {"version": 3, "format": "safetensors", "quants": {}}
    return d


@dataclass
class Master:
    name: str
    weights: Path
    weights_sha256: str
    factory: str
    data: str | None
    config: MasterConfig
    key_fingerprint: str
    accuracy: float | None


@dataclass
class Buyer:
    master: str
    id: int
    name: str
    status: str
    file: str | None = None
    sha256: str | None = None
    agreement: float | None = None
    accuracy: float | None = None
    margin: float | None = None
    codeword: str | None = None
    # Mean cosine similarity of the copy's outputs to the master's (encoders; None for classifiers).
    cosine: float | None = None
    extra: dict = field(default_factory=dict)

    def public(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "master": self.master,
            "status": self.status,
            "file": self.file,
            "sha256": self.sha256,
            "agreement": self.agreement,
            "accuracy": self.accuracy,
            "cosine": self.cosine,
            "store": self.store,
        }

    @property
    def store(self) -> str | None:
        """How the copy is kept: "patch" (`file` is BUYER.wmpatch, `wmtrace materialize` rebuilds the
        copy whose sha256 is `sha256`) or "full" (`file` is the copy); None before it is issued."""
        if not self.file:
            return None
        return "patch" if self.file.endswith(".wmpatch") else "full"


# What every backend does with its rows the same way, whatever its SQL dialect.
def pick_master(masters: list[Master], name: str | None, where: str) -> Master:
    """The named master, or the only one when no name is given (`where`: the registry as shown)."""
    if name is None:
        if len(masters) == 1:
            return masters[0]
        if not masters:
            raise UnknownMaster(f"registry {where} has no master yet (run 'wmtrace init')")
        names = ", ".join(m.name for m in masters)
        raise BadInput(f"registry has several masters ({names}); choose one with --master")
    for m in masters:
        if m.name == name:
            return m
    raise UnknownMaster(f"unknown master {name!r} in registry {where}")


def claim_stale(stale: list, wanted: list[str | None]) -> list:
    """The stale reservations (rows with a "name") to take over, removing from `wanted` what each stands
    for: a reservation completes a wanted name, or stands in for a generated one (None)."""
    claimed = []
    for r in stale:
        slot = r["name"] if r["name"] in wanted else (None if None in wanted else False)
        if slot is not False:
            wanted.remove(slot)
            claimed.append(r)
    return claimed


def buyers_query(master: str | None, status: str | None, mark: str) -> tuple[str, list]:
    """SELECT of buyers, optionally of one master and status, in ID order (`mark`: the driver's placeholder)."""
    q, args = "SELECT * FROM buyers WHERE 1 = 1", []
    if master is not None:
        q, args = q + f" AND master = {mark}", [*args, master]
    if status is not None:
        q, args = q + f" AND status = {mark}", [*args, status]
    return q + " ORDER BY master, id", args
