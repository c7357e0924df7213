"""JPEG re-encoding: the most common thing done to a picture passed on (upload sites, messengers).

Each image is encoded by Pillow's libjpeg at `quality` (4:2:0 chroma subsampling, Pillow's default)
and decoded back, so the marks must survive the quantized DCT blocks and the halved colour planes.
"""

from __future__ import annotations

import io

import numpy as np

from ..errors import BadArgument
from .base import Param
from .imaging import ImageAttack, array, pil


def jpeg(image: np.ndarray, quality: int = 75) -> np.ndarray:
    """`image` JPEG-encoded at `quality` (1-95: above 95 libjpeg stops compressing, Pillow warns) and decoded."""
    from PIL import Image

    if not 1 <= quality <= 95:
        raise BadArgument("quality", f"{quality} must be in 1..95 (Pillow's useful range)")
    buf = io.BytesIO()
    pil(image).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as img:
        return array(img)


def _run(images: list[np.ndarray], rng: np.random.Generator, quality: int) -> list[np.ndarray]:
    return [jpeg(a, quality) for a in images]


IMAGE = ImageAttack(
    name="jpeg",
    summary="Re-encode every image as JPEG at a quality, and decode it back.",
    params=(Param("quality", int, 75, "JPEG quality (Pillow, 1-95; lower is smaller and worse)"),),
    run=_run,
)
