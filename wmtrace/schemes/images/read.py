"""Soft bits from a suspect's output images on the probes: align, subtract the master's output, project.

Each output is first brought onto the master's output for the same probe (`align`): an image of the
same size is taken as it is; a smaller one is a crop, placed where it correlates best with the master's
output; any other size is resized back (a resized copy). The residual (suspect minus master, on the
aligned pixels only, after the filter that best explains what was done to the image, `channel`) is
projected on every bit's output pattern (`directions.project`): a matched filter, summed over the
images read. For an innocent buyer these sums are independent of the buyer's
codeword, which is all `accuse`'s bound needs, whatever was done to the images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import BadInput
from ...formats.images import quantize
from . import channel, directions
from .scheme import Config, stored_tensor

MIN_SIDE = 16  # a crop smaller than this (per side) is too small to place or read


@dataclass
class Reader:
    """What reading a master's mark needs: the master, its probes and outputs, the keyed directions."""

    model: nn.Module
    cfg: Config
    a: torch.Tensor  # (bits, weights), keyed
    probes: torch.Tensor  # (n, C, H, W)
    reference: torch.Tensor  # the master's outputs on the probes

    @classmethod
    def of(cls, model: nn.Module, config: dict, key: bytes, stored: dict[str, np.ndarray]) -> Reader:
        probes = stored_tensor(stored, "probes").float()
        with torch.no_grad():
            reference = model.eval()(probes)
        return cls(model, Config.from_dict(config), directions.keyed(key, stored_tensor(stored, "directions")),
                   probes, reference)

    def soft_bits(self, outputs: list[tuple[int, torch.Tensor]]) -> tuple[np.ndarray, float]:
        """Soft bits from (probe index, output C x h x w in [0, 1]) pairs, and the largest absolute
        difference from the master's outputs on the 8-bit grid (0: these are the master's own outputs)."""
        total = torch.zeros(len(self.a), dtype=torch.float64)
        largest = 0.0
        for i, y in outputs:
            if not 0 <= i < len(self.probes):
                raise BadInput(f"probe {i} does not exist (the master has {len(self.probes)})")
            ref = self.reference[i]
            aligned, mask = align(y.float(), ref)
            largest = max(largest, float(((aligned - quantize(ref)) * mask).abs().max()))
            kernel, offset = channel.fit(ref, aligned, mask)
            residual = (aligned - channel.apply(kernel, offset, ref)) * channel.interior(mask)
            total += directions.project(self.model, self.cfg.layer, self.probes[i : i + 1],
                                        channel.adjoint(kernel, residual)[None], self.a).double()
        scale = float(total.abs().mean())
        soft = (total / scale).numpy() if scale > 0 else np.zeros(len(self.a))
        return soft, largest


def align(y: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`y` on `ref`'s pixel grid and the mask of the pixels it covers."""
    if y.dim() != 3 or y.shape[0] != ref.shape[0]:
        raise BadInput(f"an output of shape {tuple(y.shape)} does not match the master's {tuple(ref.shape)}")
    (_, h, w), (_, hr, wr) = y.shape, ref.shape
    if (h, w) == (hr, wr):
        return y, torch.ones_like(ref)
    if h <= hr and w <= wr:
        if min(h, w) < MIN_SIDE:
            raise BadInput(f"an output of {w}x{h} pixels is too small to read (at least {MIN_SIDE} a side)")
        top, left = place(y, ref)
        out, mask = torch.zeros_like(ref), torch.zeros_like(ref)
        out[:, top : top + h, left : left + w] = y
        mask[:, top : top + h, left : left + w] = 1
        return out, mask
    resized = F.interpolate(y[None], size=(hr, wr), mode="bicubic", align_corners=False)[0]
    return resized.clamp(0, 1), torch.ones_like(ref)


def place(crop: torch.Tensor, ref: torch.Tensor) -> tuple[int, int]:
    """Where a crop sits in `ref`: the offset of the smallest mean squared difference (every offset tried,
    by correlation through the FFT)."""
    (_, h, w), (_, hr, wr) = crop.shape, ref.shape
    c = crop.double()
    r = ref.double()
    size = (hr, wr)
    cross = torch.fft.irfft2(torch.fft.rfft2(r, s=size) * torch.fft.rfft2(c, s=size).conj(), s=size).sum(0)
    ones = torch.zeros(size, dtype=torch.float64)
    ones[:h, :w] = 1
    energy = torch.fft.irfft2(torch.fft.rfft2((r * r).sum(0), s=size) * torch.fft.rfft2(ones, s=size).conj(), s=size)
    cost = energy - 2 * cross  # |ref patch - crop|^2 up to the crop's own energy
    valid = cost[: hr - h + 1, : wr - w + 1]
    k = int(torch.argmin(valid))
    return k // valid.shape[1], k % valid.shape[1]
