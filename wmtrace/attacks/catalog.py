"""Every attack family by name, found by looking: a module of this package that declares `ATTACK`
(on weights, `ATTACKS`), `SERVING` (through the endpoint, `SERVING_ATTACKS`; see `serving`) or `IMAGE`
(on a denoiser's output images, `IMAGE_ATTACKS`; see `imaging`).

Adding a family is adding its module (and its test); nothing here or in the CLI changes. Shared
helpers (`base`, `layers`, `trainer`, `serving`, `imaging`) declare no attack and are passed over. The
kinds have separate names: `wmtrace attack`'s commands are built from `ATTACKS` alone, `wmtrace
edit-images`'s from `IMAGE_ATTACKS` (so an image attack may share a weight attack's name: `noise`).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from .base import Attack
from .imaging import ImageAttack
from .serving import ServingAttack

_NOT_FAMILIES = {"catalog", "files"}  # this module, and the entry point that reads it


def _families(declaration: str = "ATTACK", kind: type = Attack) -> dict:
    package = __name__.rpartition(".")[0]
    found: dict = {}
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
        if info.name in _NOT_FAMILIES:
            continue
        attack = getattr(importlib.import_module(f"{package}.{info.name}"), declaration, None)
        if isinstance(attack, kind):
            if attack.name in found:
                raise RuntimeError(f"two attack families are named {attack.name!r}")
            found[attack.name] = attack
    return found


ATTACKS: dict[str, Attack] = _families()
SERVING_ATTACKS: dict[str, ServingAttack] = _families("SERVING", ServingAttack)
IMAGE_ATTACKS: dict[str, ImageAttack] = _families("IMAGE", ImageAttack)
