"""What the registry records: a registered master and an issued (or reserved) buyer copy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Master:
    name: str
    weights: Path
    weights_sha256: str
    factory: str
    data: str | None
    config: dict
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
        }
