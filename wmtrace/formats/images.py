"""Image files in and out: the outputs of an image-to-image model that a trace reads, and the probes
written for a suspect model to run on.

Outputs found in the wild are untrusted: each is checked as a regular file, decoded by Pillow under a
pixel budget (a decompression bomb's header is refused before its pixels are allocated), and fully
loaded (a truncated file fails here, in one line, not later). Probes are written as lossless 8-bit PNG,
so that what a suspect model is run on is exactly what `wmtrace` computes with.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import BadInput, CorruptFile, first_line
from .stream import write_atomic
from .untrusted import regular_file

# One image above this many pixels is refused before it is decoded (a 50-megapixel RGB image is 150 MB).
MAX_PIXELS = 50_000_000
# What a folder's images are: its files with these suffixes (others are passed over, with a note).
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
log = logging.getLogger("wmtrace")


def image_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The files `paths` name: a file as given (whatever its suffix), a folder as its image files
    (`SUFFIXES`, hidden files and subfolders passed over) sorted by name."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            try:
                found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            except OSError as e:
                raise BadInput(f"{p}: cannot list the folder ({e.strerror})") from e
            images = [f for f in found if f.suffix.lower() in SUFFIXES]
            if not images:
                raise BadInput(f"{p}: no images in this folder (looked for {', '.join(SUFFIXES)})")
            if len(images) < len(found):
                log.warning("%s: passed over %d file(s) without an image suffix", p, len(found) - len(images))
            files += images
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise BadInput(f"{p}: not a file or folder")
        else:
            raise BadInput(f"{p}: no such file or folder")
    return files


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One image file as an (H, W, 3) uint8 array (RGB; the first frame of an animation), its size
    checked against `MAX_PIXELS` before decoding. Anything Pillow cannot read whole is one BadInput line."""
    from PIL import Image

    path = Path(path)
    regular_file(path, "image")  # a fifo or device is refused before Pillow opens it (opening a fifo blocks)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise CorruptFile(f"{path}: {w}x{h} pixels, over the budget of {MAX_PIXELS / 1e6:g} megapixels")
                img.load()
                return _eight_bit(img, path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CorruptFile(f"{path}: {first_line(e)}") from e
    except Image.UnidentifiedImageError as e:
        raise BadInput(f"{path}: not an image (Pillow reads no format in it)") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:  # what Pillow raises on damaged data
        if isinstance(e, OSError) and e.errno is not None:  # unreadable: permissions, a vanished file
            raise BadInput(f"{path}: cannot read ({e.strerror})") from e
        raise CorruptFile(f"{path}: damaged or truncated image ({first_line(e)})") from e


def array(img) -> np.ndarray:
    """A Pillow image as a new, writable (H, W, 3) uint8 array."""
    return np.array(img.convert("RGB"), dtype=np.uint8)


def _eight_bit(img, path: Path) -> np.ndarray:
    """A decoded image as 8-bit RGB: 16-bit grey scaled (Pillow's own conversion would clip it at 255),
    32-bit integer and float pixels refused (their range is a guess)."""
    if img.mode.startswith("I;16"):
        grey = np.rint(np.asarray(img, dtype=np.float64) / 257.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode in ("I", "F"):
        raise BadInput(f"{path}: {'float' if img.mode == 'F' else '32-bit'} pixels; give 8- or 16-bit images")
    return array(img)


def write_png(pixels: np.ndarray, path: str | os.PathLike) -> None:
    """(H, W, 3) uint8 pixels as a PNG file, written atomically."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buf, "PNG")
    write_atomic(path, [buf.getvalue()], digest=False)


def quantize(x):
    """A float image (tensor) in [0, 1] on the 8-bit grid: what an image file holds of it."""
    return (x.clamp(0, 1) * 255).round() / 255


def to_pixels(x) -> np.ndarray:
    """A C x H x W tensor in [0, 1] as (H, W, 3) uint8 (a 1-channel image repeated)."""
    a = np.asarray(x.detach().float().clamp(0, 1).numpy() if hasattr(x, "detach") else x, dtype=np.float32)
    a = np.repeat(a, 3, 0) if a.shape[0] == 1 else a
    return np.round(a.transpose(1, 2, 0) * 255).astype(np.uint8)


def from_pixels(pixels: np.ndarray):
    """(H, W, 3) uint8 as a 3 x H x W float tensor in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255
