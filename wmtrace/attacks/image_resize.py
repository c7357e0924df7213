"""Resizing: a picture scaled down for a thumbnail or a page, and often back up by whoever uses it.

Scaling down by `scale` throws away the finest detail (what a 0.5x image cannot hold is gone), and
scaling back to the original size with the same filter leaves a blurred copy of the same shape, which
is what a tracer then sees; `back=False` keeps the small image.
"""

from __future__ import annotations

import numpy as np

from ..errors import BadArgument
from .base import Param
from .imaging import MAX_PIXELS, ImageAttack, array, pil

FILTERS = ("bilinear", "bicubic", "lanczos")


def resize(image: np.ndarray, scale: float = 0.5, filter: str = "bicubic", back: bool = True) -> np.ndarray:
    """`image` resized by `scale` (each side, at least one pixel) with Pillow's `filter`, then back to its
    own size unless `back` is False."""
    from PIL import Image

    if filter not in FILTERS:
        raise BadArgument("filter", f"{filter!r}: choose from {', '.join(FILTERS)}")
    h, w = image.shape[:2]
    if not 0 < scale <= 8 or (h * scale) * (w * scale) > MAX_PIXELS:
        raise BadArgument("scale", f"{scale} must be in (0, 8] and leave at most {MAX_PIXELS / 1e6:g} megapixels")
    resample = getattr(Image.Resampling, filter.upper())
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = pil(image).resize(size, resample)
    if back:
        img = img.resize((w, h), resample)
    return array(img)


def _run(images: list[np.ndarray], rng: np.random.Generator, scale: float, filter: str,
         back: bool) -> list[np.ndarray]:
    return [resize(a, scale, filter, back) for a in images]


IMAGE = ImageAttack(
    name="resize",
    summary="Resize every image by a scale, and back to its own size (unless --no-back).",
    params=(
        Param("scale", float, 0.5, "Factor on each side (0.5: half the width and height; up to 8)"),
        Param("filter", str, "bicubic", "Resampling filter (Pillow)", choices=FILTERS),
        Param("back", bool, True, "Resize back to the original size (--no-back keeps the resized image)"),
    ),
    run=_run,
)
