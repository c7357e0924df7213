"""Gaussian blur: smooths away the high frequencies where a faint per-pixel mark tends to live.

Pillow's `ImageFilter.GaussianBlur(radius)` (radius: the Gaussian's standard deviation in pixels,
approximated by box blurs) on every image; radius 0 leaves the image as it is.
"""

from __future__ import annotations

import numpy as np

from ..errors import BadArgument
from .base import Param
from .imaging import ImageAttack, array, pil


def blur(image: np.ndarray, radius: float = 1.0) -> np.ndarray:
    """`image` blurred by a Gaussian of `radius` pixels (0-100)."""
    from PIL import ImageFilter

    if not 0 <= radius <= 100:
        raise BadArgument("radius", f"{radius} must be in 0..100 pixels")
    return array(pil(image).filter(ImageFilter.GaussianBlur(radius)))


def _run(images: list[np.ndarray], rng: np.random.Generator, radius: float) -> list[np.ndarray]:
    return [blur(a, radius) for a in images]


IMAGE = ImageAttack(
    name="blur",
    summary="Blur every image with a Gaussian (Pillow's GaussianBlur).",
    params=(Param("radius", float, 1.0, "Radius (standard deviation) of the Gaussian in pixels, 0-100"),),
    run=_run,
)
