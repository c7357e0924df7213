"""What a scheme is: a way to carry a codeword in a buyer's copy and read it back from a leak.

The coding layer (`codes`, `keys`, `accuse`) turns a buyer into a codeword and soft bits back into a
buyer with a bound; a scheme moves bits in and out of a model and knows nothing of buyers:

    init   prepare(master, bits, options)  -> its configuration (JSON) and tensors stored with the master
    issue  issuer(...).embed(model, bits)   -> the copy carries the codeword
    trace  locate(evidence, ...)            -> where the bits are (None: not this master's model)
           extract(located, key)            -> soft bits in margins, NaN where nothing is left

The white-box scheme reads weights; a black-box scheme would read a model's answers to queries. The
trace pipeline combines the soft bits of every scheme a master was registered with (`accuse.combine`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..batches import Inputs
from ..registry import Master

# (repair step, repair steps, smallest bit margin) -> None, while one copy is being marked.
StepProgress = Callable[[int, int, float], None]


@dataclass
class MasterModel:
    """What registration hands a scheme: the master built and loaded, and the user's data."""

    model: nn.Module  # eval mode, the master's weights loaded
    state: dict[str, torch.Tensor]  # every registered tensor, by name
    train: Dataset | None  # the user's training inputs (placement, repair)
    probe: Inputs | None  # a few real inputs, to measure what a mark costs
    held_out: Dataset | None = None  # the user's held-out inputs (fidelity target, `init --fidelity`)


@dataclass
class Located:
    """A scheme's evidence of one master in a leak: how well it matched, and what it found where."""

    score: float  # higher is a closer match: masters are tried best first
    found: Any  # the scheme's own: for white-box, the aligned carriers
    report: list[dict] = field(default_factory=list)  # shown to the user (`TraceResult.carriers`)


class Issuer(Protocol):
    def embed(self, model: nn.Module, bits: np.ndarray, seed: int, progress: StepProgress | None,
              scale: float = 1.0) -> None:
        """Mark `model` (a fresh copy of the master) with `bits`, in place; `scale` < 1 asks for a weaker
        mark (issue's fidelity back-off), which a scheme that cannot weaken its mark ignores."""

    def margin(self, model: nn.Module, bits: np.ndarray) -> float:
        """The smallest bit margin of a marked copy (1.0: every bit as placed)."""


class Scheme(Protocol):
    name: str
    stage: int  # marking order within a copy: lower first (weights inside, then the output layer)

    def prepare(self, master: MasterModel, bits: int, options: dict) -> tuple[dict, dict[str, torch.Tensor]]: ...

    def issuer(self, master: MasterModel, m: Master, config: dict, key: bytes,
               stored: dict[str, np.ndarray]) -> Issuer: ...

    def locate(self, evidence: Mapping[str, np.ndarray], m: Master, config: dict) -> Located | None: ...

    def extract(self, located: Located, m: Master, config: dict, key: bytes, bits: int,
                stored: dict[str, np.ndarray]) -> np.ndarray: ...

    def revealed(self, m: Master, config: dict) -> list[str]:
        """The master's tensors `locate` and `extract` read: what an evidence bundle reveals so that an
        arbiter can re-run them (nothing else of the master leaves the registry)."""
