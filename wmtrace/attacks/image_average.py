"""Collusion on images: several buyers average the same pictures as their copies produced them.

Where each copy's pictures carry their buyer's mark, the pixel mean of k copies' pictures carries
each mark at 1/k of its strength, mixed; tracing must still name at least one colluder. The images
are paired by position (the CLI pairs them by file name): every copy gives the same number of images
and the same shape at each position, else nothing is averaged.
"""

from __future__ import annotations

import numpy as np

from ..errors import BadInput
from .imaging import ImageAttack


def average(copies: list[list[np.ndarray]]) -> list[np.ndarray]:
    """The pixel mean of each image over `copies` (one list per copy), rounded half to even (`np.rint`)."""
    if len(copies) < 2:
        raise BadInput(f"averaging needs the images of at least two copies, not {len(copies)}")
    counts = [len(c) for c in copies]
    if len(set(counts)) != 1:
        raise BadInput(f"the copies give different numbers of images ({', '.join(map(str, counts))})")
    out = []
    for j, same in enumerate(zip(*copies, strict=True)):
        shapes = [a.shape for a in same]
        if len(set(shapes)) != 1:
            raise BadInput(f"image {j + 1} differs in shape between copies "
                           f"({', '.join('x'.join(map(str, s)) for s in shapes)})")
        total = same[0].astype(np.uint32)
        for a in same[1:]:
            total += a
        out.append(np.rint(total / len(same)).astype(np.uint8))
    return out


def _run(copies: list[list[np.ndarray]], rng: np.random.Generator) -> list[np.ndarray]:
    return average(copies)


IMAGE = ImageAttack(
    name="average",
    summary="Average the same images as produced by several copies (pixel mean, rounded): collusion.",
    params=(),
    run=_run,
    merges=True,
)
