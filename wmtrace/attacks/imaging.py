"""Attacks on output images: what a leaker does to the images a marked denoiser produced, not to its weights.

An image-to-image copy carries its buyer's mark in the pictures it outputs, so a leaker who passes
those pictures on can re-encode, resize, crop, blur, add noise, jitter colours, or average the same
pictures as produced by several copies (collusion). An image attack family is one module of this
package named `image_NAME.py` that declares

    IMAGE = ImageAttack(name, summary, params, run, merges=False)

and `catalog.IMAGE_ATTACKS` finds it as it finds weight and serving attacks. An image is an (H, W, 3)
uint8 numpy array (sizes may differ from image to image); `run(images, rng, **params)` takes a list of
them and returns a list of new ones (the inputs are not changed), drawing every random choice from
`rng` so that a seed repeats a run. When the family `merges`, `images` is a list of lists, one per
copy, the same length and shapes, and `run` returns one list. Parameters are declared with
`base.Param` and checked by `files.check`, exactly as a weight attack's; ranges are checked by `run`
(`BadArgument`, which the CLI shows as the flag).

`read_images` and `write_images` are the file side (Pillow): images are decoded only after their
header's size is checked against `MAX_PIXELS`, so a decompression bomb costs nothing, and written as
lossless PNG, one atomic file each. `attacks.edit_images` runs an attack by name.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadArgument, BadInput, InternalError
from ..formats.images import MAX_PIXELS, SUFFIXES, array, image_files, read_image  # noqa: F401 (re-exported)
from ..formats.stream import write_atomic
from .base import Param

log = logging.getLogger("wmtrace")

# list[image] (list[list[image]] when merging), rng, **params -> list[image]
RunImages = Callable[..., list[np.ndarray]]


@dataclass(frozen=True)
class ImageAttack:
    """An image attack family's declaration: its parameters written once, and how it edits images.

    `merges`: it takes the same images as produced by several copies (a list of lists) and returns one list.
    """

    name: str
    summary: str
    params: tuple[Param, ...]
    run: RunImages
    merges: bool = False

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def check_image(a: object, where: str) -> np.ndarray:
    """`a` if it is an image as attacks take them ((H, W, 3) uint8, at least one pixel), else one BadInput line."""
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or 0 in a.shape:
        what = f"{a.dtype} array of shape {list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
        raise BadInput(f"{where}: an image is an (H, W, 3) uint8 array, not a {what}")
    return a


def apply(attack: ImageAttack, images: Sequence, seed: int, values: dict) -> list[np.ndarray]:
    """`images` edited by `attack` with its checked parameter `values` (`files.check`) and a generator
    seeded by `seed`; a merging attack takes at least two copies' lists. `attacks.edit_images` is the
    entry point by name."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise BadArgument("seed", f"must be a whole number, 0 or more, not {seed!r}")
    if attack.merges:
        copies = [list(c) for c in images]
        if len(copies) < 2:
            raise BadInput(f"{attack.name} merges the images of at least two copies, not {len(copies)}")
        for i, c in enumerate(copies):
            for j, a in enumerate(c):
                check_image(a, f"copy {i + 1}, image {j + 1}")
        inputs: Sequence = copies
    else:
        inputs = [check_image(a, f"image {j + 1}") for j, a in enumerate(images)]
    out = attack.run(inputs, np.random.default_rng(seed), **values)
    expected = len(inputs[0]) if attack.merges else len(inputs)
    if len(out) != expected:
        raise InternalError(f"{attack.name} returned {len(out)} images for {expected}")
    for j, a in enumerate(out):
        try:
            check_image(a, f"{attack.name}'s image {j + 1}")
        except BadInput as e:
            raise InternalError(str(e)) from e
    return out


def pil(a: np.ndarray):
    """An (H, W, 3) uint8 array as a Pillow RGB image (for the attacks that use Pillow's filters)."""
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(a), "RGB")


def read_images(paths: Iterable[str | os.PathLike]) -> list[tuple[str, np.ndarray]]:
    """Every image `paths` name (files, or folders: their image files sorted by name) as (name, array):
    the name is the file's stem, the array (H, W, 3) uint8 RGB."""
    return [(f.stem, read_image(f)) for f in image_files(paths)]


def write_images(named: Sequence[tuple[str, np.ndarray]], folder: str | os.PathLike,
                 inputs: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Write each (name, image) to `folder`/name.png (lossless PNG, each file atomic) and return the
    paths. Everything is checked before anything is written: names are plain and distinct, images
    are images, and no file would replace one of `inputs` (the files the images were read from)."""
    folder = Path(folder)
    targets = []
    for name, a in named:
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise BadInput(f"{name!r}: not a plain file name to write an image as")
        check_image(a, name)
        targets.append(folder / f"{name}.png")
    seen: set[Path] = set()
    for t in targets:
        if t in seen:
            raise BadInput(f"two images would both be written as {t} (inputs with the same name)")
        seen.add(t)
    kept = {Path(p).resolve() for p in inputs}
    clash = next((t for t in targets if t.resolve() in kept), None)
    if clash is not None:
        raise BadInput(f"{clash}: is one of the inputs; write to another folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"{folder}: cannot make the output folder ({e.strerror})") from e
    for t, (_, a) in zip(targets, named, strict=True):
        buf = io.BytesIO()
        pil(a).save(buf, format="PNG")
        write_atomic(t, [buf.getbuffer()], digest=False)
    return targets
