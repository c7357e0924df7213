"""Image files in and out: the outputs of an image-to-image model that a trace reads, and the probes
written for a suspect model to run on.

Outputs found in the wild are untrusted: each is checked as a regular file, decoded by Pillow under a
pixel budget (a decompression bomb's header is refused before its pixels are allocated), and fully
loaded (a truncated file fails here, in one line, not later). Probes are written as lossless 8-bit PNG,
so that what a suspect model is run on is exactly what `wmtrace` computes with.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from ..errors import BadInput, CorruptFile
from .stream import write_atomic
from .untrusted import regular_file

MAX_PIXELS = 50_000_000  # per image: 200 MB as RGB uint8
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm")


def files(paths: list[str | os.PathLike]) -> list[Path]:
    """The image files named: each file given, and a folder's image files in name order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if f.suffix.lower() in SUFFIXES and not f.name.startswith("."))
        else:
            found.append(p)
    if not found:
        raise BadInput(f"no image files in {', '.join(map(str, paths)) or 'nothing given'}")
    return found


def read(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of an image file; CorruptFile for anything Pillow cannot fully decode."""
    from PIL import Image

    path = Path(path)
    size = regular_file(path, "image").st_size
    with open(path, "rb") as f:
        data = f.read(size + 1)
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise CorruptFile(f"{path}: {w}x{h} pixels, over the {MAX_PIXELS:,} an image may have")
            return np.asarray(im.convert("RGB")).copy()
    except CorruptFile:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CorruptFile(f"{path}: not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                          ) from e


def write_png(pixels: np.ndarray, path: str | os.PathLike) -> None:
    """(H, W, 3) uint8 pixels as a PNG file, written atomically."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buf, "PNG")
    write_atomic(path, [buf.getvalue()], digest=False)


def to_pixels(x) -> np.ndarray:
    """A C x H x W tensor in [0, 1] as (H, W, 3) uint8 (a 1-channel image repeated)."""
    a = np.asarray(x.detach().float().clamp(0, 1).numpy() if hasattr(x, "detach") else x, dtype=np.float32)
    a = np.repeat(a, 3, 0) if a.shape[0] == 1 else a
    return np.round(a.transpose(1, 2, 0) * 255).astype(np.uint8)


def from_pixels(pixels: np.ndarray):
    """(H, W, 3) uint8 as a 3 x H x W float tensor in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255
