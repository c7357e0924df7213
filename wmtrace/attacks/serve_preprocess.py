"""Input preprocessing on the server: every image resized down and back (bilinear) and JPEG-compressed.

A serving pipeline that decodes uploads, resizes them and re-encodes them moves every input a
little before the model sees it. Boundary queries sit on the master's decision boundary with a
margin of one logit, so such small moves may flip their answers, which is what this measures;
ordinary inputs, far from the boundary, keep theirs. Inputs are normalised images (n, C, H, W) or
(n, H, W): they are de-normalised to [0, 255] uint8 with the data's mean and std (Fashion-MNIST's by
default, `wmtrace.data`), resized with Pillow, JPEG-encoded and decoded (the codec users' servers
run), and normalised again. Texts are out of scope here: a text server's preprocessing
(normalisation, truncation) is another attack.
"""

from __future__ import annotations

import io

import numpy as np

from ..data import MEAN, STD
from ..errors import BadInput
from .base import Param
from .serving import Predict, ServingAttack


def _image(a: np.ndarray, size: int, quality: int):
    """One (C, H, W) uint8 image through resize down, resize back and JPEG; returned as (C, H, W) uint8."""
    from PIL import Image

    channels, h, w = a.shape
    img = Image.fromarray(a[0] if channels == 1 else np.moveaxis(a, 0, -1), "L" if channels == 1 else "RGB")
    if size and size != h:
        small = (size, max(1, round(w * size / h)))
        img = img.resize(small[::-1], Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    out = np.asarray(Image.open(buf).convert(img.mode))
    return out[None] if channels == 1 else np.moveaxis(out, -1, 0)


def preprocess(x: np.ndarray, size: int = 24, quality: int = 75, mean: float = MEAN, std: float = STD) -> np.ndarray:
    """`x` (normalised images, (n, C, H, W) with C 1 or 3, or (n, H, W)) as the model sees it after the
    server's pipeline: to uint8 pixels, resized to `size` pixels high and back (0 or H: no resize),
    JPEG at `quality`, normalised again. Same shape, float32."""
    if not 1 <= quality <= 95:
        raise BadInput(f"preprocess: quality {quality} must be in [1, 95] (Pillow's useful range)")
    if size < 0:
        raise BadInput(f"preprocess: size {size} must be 0 (no resize) or more")
    x = np.asarray(x, dtype=np.float32)
    flat = x[:, None] if x.ndim == 3 else x
    if flat.ndim != 4 or flat.shape[1] not in (1, 3):
        raise BadInput(f"preprocess: inputs of shape {list(x.shape)} are not images (n, C, H, W), C 1 or 3")
    pixels = np.clip(np.rint((flat * std + mean) * 255.0), 0, 255).astype(np.uint8)
    out = np.stack([_image(p, size, quality) for p in pixels]) if len(pixels) else pixels
    back = ((out.astype(np.float32) / 255.0) - mean) / std
    return back.reshape(x.shape).astype(np.float32)


def _wrap(predict: Predict, data, size: int, quality: int) -> Predict:
    return lambda x: predict(preprocess(x, size, quality))


SERVING = ServingAttack(
    name="preprocess",
    summary="Resize every image down and back (bilinear) and JPEG-compress it before the model sees it.",
    params=(
        Param("size", int, 24, "Height the image is resized to and back from (0: no resize)"),
        Param("quality", int, 75, "JPEG quality (Pillow, 1-95)"),
    ),
    wrap=_wrap,
)
