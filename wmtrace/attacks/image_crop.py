"""Cropping: a leaker keeps part of each picture, which moves the marks off their places and drops some.

The kept part has the image's aspect ratio and `fraction` of its area (each side scaled by
sqrt(fraction), at least one pixel), at a position drawn from the run's generator or in the centre.
The result is the smaller image: nothing is scaled back, so a tracer sees only what was kept.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import BadArgument
from .base import Param
from .imaging import ImageAttack

WHERE = ("random", "center")


def crop(image: np.ndarray, fraction: float = 0.5, where: str = "random",
         rng: np.random.Generator | None = None) -> np.ndarray:
    """The part of `image` with its aspect ratio and `fraction` of its area, at a random position
    (from `rng`) or the centre, as a new array."""
    if not 0 < fraction <= 1:
        raise BadArgument("fraction", f"{fraction} must be in (0, 1]")
    if where not in WHERE:
        raise BadArgument("where", f"{where!r}: choose from {', '.join(WHERE)}")
    h, w = image.shape[:2]
    side = math.sqrt(fraction)
    ch, cw = max(1, round(h * side)), max(1, round(w * side))
    if where == "center":
        top, left = (h - ch) // 2, (w - cw) // 2
    else:
        rng = rng if rng is not None else np.random.default_rng()
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return image[top : top + ch, left : left + cw].copy()


def _run(images: list[np.ndarray], rng: np.random.Generator, fraction: float, where: str) -> list[np.ndarray]:
    return [crop(a, fraction, where, rng) for a in images]


IMAGE = ImageAttack(
    name="crop",
    summary="Keep a fraction of every image's area (aspect ratio kept) at a random position or the centre.",
    params=(
        Param("fraction", float, 0.5, "Fraction of the area kept, in (0, 1]"),
        Param("where", str, "random", "Where the kept part is (random: drawn from --seed)", choices=WHERE),
    ),
    run=_run,
)
