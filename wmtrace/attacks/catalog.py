"""Every attack family by name, found by looking: a module of this package that declares `ATTACK`.

Adding a family is adding its module (and its test); nothing here or in the CLI changes. Shared
helpers (`base`, `layers`, `trainer`) declare no attack and are passed over.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from .base import Attack

_NOT_FAMILIES = {"catalog", "files"}  # this module, and the entry point that reads it


def _families() -> dict[str, Attack]:
    package = __name__.rpartition(".")[0]
    found: dict[str, Attack] = {}
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
        if info.name in _NOT_FAMILIES:
            continue
        attack = getattr(importlib.import_module(f"{package}.{info.name}"), "ATTACK", None)
        if isinstance(attack, Attack):
            if attack.name in found:
                raise RuntimeError(f"two attack families are named {attack.name!r}")
            found[attack.name] = attack
    return found


ATTACKS: dict[str, Attack] = _families()
