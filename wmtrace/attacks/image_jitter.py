"""Colour jitter: brightness, contrast and saturation changed a little, image by image, as editors and
augmentation pipelines do; a mark read from pixel values must not depend on their exact scale.

For each image, three factors are drawn uniformly in [1 - strength, 1 + strength] and applied in
that order with `PIL.ImageEnhance` (Brightness, Contrast, Color); a hue shift, off by default, turns
the colour circle by an angle drawn uniformly in [-hue, hue] of a full turn (Pillow's HSV, 256 steps).
"""

from __future__ import annotations

import numpy as np

from ..errors import BadArgument
from .base import Param
from .imaging import ImageAttack, array, pil


def jitter(image: np.ndarray, strength: float = 0.1, hue: float = 0.0,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """`image` with brightness, contrast and saturation scaled by factors drawn in [1 - strength,
    1 + strength] (from `rng`), and its hue turned by up to `hue` of a turn (0-0.5)."""
    from PIL import Image, ImageEnhance

    if not 0 <= strength < 1:
        raise BadArgument("strength", f"{strength} must be in [0, 1)")
    if not 0 <= hue <= 0.5:
        raise BadArgument("hue", f"{hue} must be in 0..0.5 of a turn")
    rng = rng if rng is not None else np.random.default_rng()
    img = pil(image)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    if hue > 0:
        turn = int(round(rng.uniform(-hue, hue) * 256)) % 256
        h, s, v = img.convert("HSV").split()
        h = h.point(lambda x: (x + turn) % 256)
        img = Image.merge("HSV", (h, s, v)).convert("RGB")
    return array(img)


def _run(images: list[np.ndarray], rng: np.random.Generator, strength: float, hue: float) -> list[np.ndarray]:
    return [jitter(a, strength, hue, rng) for a in images]


IMAGE = ImageAttack(
    name="jitter",
    summary="Change every image's brightness, contrast and saturation by random factors (and its hue, if asked).",
    params=(
        Param("strength", float, 0.1, "Each factor is drawn in [1 - strength, 1 + strength], strength in [0, 1)"),
        Param("hue", float, 0.0,
              "Largest hue shift, as a fraction of a turn of the colour circle (0: none, up to 0.5)"),
    ),
    run=_run,
)
