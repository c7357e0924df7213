"""Additive Gaussian noise on pixels: the cheapest way to bury a faint signal, paid for in visible grain.

Noise of standard deviation `sigma` grey levels is added to every channel of every pixel, and the
result is rounded and clipped to 0..255 (so near black or white the noise is smaller than `sigma`).
"""

from __future__ import annotations

import numpy as np

from ..errors import BadArgument
from .base import Param
from .imaging import ImageAttack


def noise(image: np.ndarray, sigma: float = 5.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """`image` plus Gaussian noise of `sigma` grey levels (0-255), rounded and clipped to uint8."""
    if not 0 <= sigma <= 255:
        raise BadArgument("sigma", f"{sigma} must be in 0..255 grey levels")
    rng = rng if rng is not None else np.random.default_rng()
    noisy = image.astype(np.float32) + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _run(images: list[np.ndarray], rng: np.random.Generator, sigma: float) -> list[np.ndarray]:
    return [noise(a, sigma, rng) for a in images]


IMAGE = ImageAttack(
    name="noise",
    summary="Add Gaussian noise to every pixel (rounded and clipped to 0-255).",
    params=(Param("sigma", float, 5.0, "Standard deviation of the noise, in grey levels (0-255)"),),
    run=_run,
)
