"""What every attack family shares: its declaration (`Attack`, `Param`) and a few state-dict helpers.

An attack family is one module that holds the attack's function(s) and one `Attack` declaring its
parameters: name, type, default, help and choices, written once. The CLI commands
(`wmtrace.cli.attack`), the file-level entry point (`wmtrace.attacks.files.apply`, behind
`api.attack`) and the checks on what a caller passes are all derived from that declaration, so a
default such as fine-tuning's learning rate lives in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BadInput

State = dict[str, torch.Tensor]

# What `Attack.run` is called with: the state (a list of states for a merging attack), a `Trainer`
# (None unless the attack declares `needs_data`), the report dict the caller prints (an attack adds
# what it measured, e.g. `attacker_ber`), and every declared parameter as a keyword.
Run = Callable[..., Any]


@dataclass(frozen=True)
class Param:
    """One parameter of an attack, as the library and the command line both take it.

    `type` is float, int, bool, str or list (a list of strings, given by repeating the flag);
    `choices` makes a str parameter an enumeration; `flag` is the command line's spelling when it is
    not `--NAME` (`--layer` for `layers`; `--part` for `project`'s `mode`, the keyword `api.attack`
    has always taken); `required` makes the command line insist on it (the library reports a
    missing one itself, in its own words).
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    flag: str | None = None
    required: bool = False


@dataclass(frozen=True)
class Attack:
    """An attack family's declaration: the one place its parameters, defaults and help are written.

    `needs_data`: the attack takes the model code and the attacker's data (a `Trainer`, built from
    `--model module:factory` and `--data module:function`); `merges`: it takes several copies
    (collusion) instead of one.
    """

    name: str
    summary: str
    params: tuple[Param, ...]
    run: Run
    needs_data: bool = False
    merges: bool = False

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def copy_state(state: State) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


def check_fraction(strength: float, what: str) -> None:
    if not 0.0 <= strength < 1.0:
        raise BadInput(f"{what}: strength {strength} must be a fraction in [0, 1)")


def prunable(state: State) -> list[str]:
    """Weights a pruning tool would touch: conv and linear weights, not norms or biases."""
    return [k for k, v in state.items() if v.is_floating_point() and v.dim() >= 2]


def seed_param(help: str = "Random seed") -> Param:
    return Param("seed", int, 0, help)
