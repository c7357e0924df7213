"""Schemes carry a codeword in a copy and read it back from a leak (`base.Scheme`), one per folder.

A new scheme: a folder implementing `base.Scheme`, listed in `SCHEMES`; registration, issuing and
tracing call it through that protocol and nothing else.
"""

from __future__ import annotations

from ..errors import BadInput
from .base import Issuer, Located, MasterModel, Scheme
from .blackbox import BlackBox
from .images import Images
from .whitebox import WhiteBox

SCHEMES: dict[str, Scheme] = {s.name: s for s in (WhiteBox(), BlackBox(), Images())}


def get(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise BadInput(f"unknown scheme {name!r} (known: {', '.join(SCHEMES)})") from None


__all__ = ["SCHEMES", "Issuer", "Located", "MasterModel", "Scheme", "get"]
