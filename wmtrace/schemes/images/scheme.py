"""The output-image scheme: every image a buyer's copy produces carries the buyer's codeword
(Zhang et al. 2021, made per buyer, error-corrected and bounded; no training per buyer).

At `init`: the convolution to mark (`layer`, by default the one whose marks are smoothest), the
subspace of its weights a mark lives in (`directions.choose`), the probe inputs a suspect model is run
on, and the strength that puts a copy's outputs `psnr` dB from the master's. At `issue`: the closed-form
weight change `s * sum_i c_i A_i` (`A_i` keyed), inside the copy's own layer: there is no separate layer
to cut off. At trace: a suspect's outputs on the probes are compared with the master's, and the
difference is read as soft bits by `read.Reader`; weights are the white-box scheme's evidence, so
`locate` finds nothing in a weight file.

Reading needs the inputs the outputs came from: the probes (sent by `wmtrace query`, or exported with
`wmtrace probes` and run by whoever holds the suspect model). A reader without the inputs (the blind
extractor of the paper, trained at `init`) did not learn on a 2-core machine (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ... import modelio
from ...errors import BadArgument, BadInput
from ...registry import Master
from ..base import Located, MasterModel, StepProgress
from . import directions

NAME = "images"
PREFIX = "images."
PROBES = 16  # probe inputs stored (held-out split): what `query` sends and `wmtrace probes` writes
FIT_INPUTS = 24  # training inputs the subspace is chosen on
DEFAULT_PSNR = 45.0  # dB between a copy's outputs and the master's: 0.05 dB of task PSNR at 31.7 dB


@dataclass(frozen=True)
class Config:
    """How a master's output mark is made and read."""

    layer: str  # the convolution weight that carries the mark
    strength: float  # s: the weight change is s * sum_i c_i A_i (A_i at unit output energy per pixel)
    psnr: float = DEFAULT_PSNR  # the copies' outputs' PSNR to the master's, on the probes
    seed: int = 0  # the base directions' seed (not secret: the key assigns bits)
    # Kernels mirror-symmetric (`directions.mirrored`): marks that survive surrogates trained on flipped
    # pairs; False: the smoothest directions of the full space, which survive JPEG, resizing and blur
    # better (BENCHMARKS.md, *Marks in output images*).
    mirror: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def check_options(psnr: float | None) -> None:
    if psnr is not None and not 20.0 <= psnr <= 80.0:
        raise BadArgument("image_psnr", f"{psnr}: use a PSNR between 20 and 80 dB")


class Images:
    name = NAME
    stage = 2  # after the white-box mark: the subspace is read on the copy as it leaves

    def prepare(self, master: MasterModel, bits: int, options: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        """Choose the layer and the subspace, store the probes, calibrate the strength."""
        check_options(options.get("image_psnr"))
        held_out = master.held_out if master.held_out is not None else master.train
        if master.train is None or held_out is None:
            raise BadInput("the output-image scheme needs the master's inputs (--data) to choose its mark and probes")
        fit, probes = _images(master.train, FIT_INPUTS), _images(held_out, PROBES)
        model = master.model.eval()
        with torch.no_grad():
            if model(probes[:1]).shape != probes[:1].shape:
                raise BadInput("the output-image scheme marks image-to-image models (outputs the inputs' shape)")
        layer = options.get("image_layer") or smoothest(model, fit)
        if layer not in directions.conv_layers(model):
            raise BadArgument("image_layer", f"{layer!r} is not a convolution weight of the model")
        seed = int(options.get("seed") or 0)
        mirror = options.get("image_mirror") is not False
        dirs = directions.choose(model, layer, fit, bits, seed, mirror)
        psnr = float(options.get("image_psnr") or DEFAULT_PSNR)
        strength = calibrate(model, layer, dirs, probes, psnr, seed)
        config = Config(layer, strength, psnr, seed, mirror)
        return config.to_dict(), {PREFIX + "directions": dirs.contiguous(), PREFIX + "probes": probes.contiguous()}

    def issuer(self, master: MasterModel, m: Master, config: dict, key: bytes,
               stored: dict[str, np.ndarray]) -> Marker:
        return Marker(Config.from_dict(config), directions.keyed(key, stored_tensor(stored, "directions")),
                      stored_tensor(stored, "probes").float())

    def locate(self, evidence: Mapping[str, np.ndarray], m: Master, config: dict) -> Located | None:
        return None  # a weight file is the white-box scheme's evidence; this one reads output images

    def extract(self, located: Located, m: Master, config: dict, key: bytes, bits: int,
                stored: dict[str, np.ndarray]) -> np.ndarray:
        return np.full(bits, np.nan)

    def revealed(self, m: Master, config: dict) -> list[str]:
        return []  # reads a model's outputs, not the weights of a file


class Marker:
    """Marks copies: W += s * sum_i c_i A_i in the chosen layer, rescaled so that this copy's own outputs on
    the probes (before rounding to 8 bits) are exactly the configured PSNR from the master's, whatever the
    codeword. What is left varies: on the example at 45 dB, 8-bit outputs 43.6-45.6 dB from the master's
    and task PSNR 0.13-0.30 dB below it over 8 copies (0.08-0.20 at 46 dB)."""

    def __init__(self, cfg: Config, a: torch.Tensor, probes: torch.Tensor):
        self.cfg, self.a, self.probes = cfg, a, probes

    def embed(self, model: nn.Module, bits: np.ndarray, seed: int, progress: StepProgress | None,
              scale: float = 1.0) -> None:
        w = dict(model.named_parameters())[self.cfg.layer]
        delta = (self.cfg.strength * (signed(bits) @ self.a)).view_as(w).to(w.dtype)
        psnr = self.cfg.psnr - 20 * math.log10(scale)  # a weaker mark asked for: `scale` of its amplitude
        s = to_psnr(model.eval(), w, delta, self.probes, psnr, steps=1)  # nearly linear: one step is enough
        with torch.no_grad():
            w += s * delta

    def margin(self, model: nn.Module, bits: np.ndarray) -> float:
        return 1.0  # placed in closed form; the issue pipeline's self-check reads it from outputs


def signed(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(2.0 * np.asarray(bits, dtype=np.float32) - 1.0)


def stored_tensor(stored: dict[str, np.ndarray], name: str) -> torch.Tensor:
    try:
        return torch.from_numpy(np.ascontiguousarray(stored[PREFIX + name]))
    except KeyError:
        raise BadInput(f"the master's stored output-image {name!r} is missing: register it again") from None


def _images(ds, n: int) -> torch.Tensor:
    x = modelio.tensors(ds, n)[0]
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise BadInput("the output-image scheme needs image inputs (N x C x H x W tensors)")
    return x.float()


def smoothest(model: nn.Module, x: torch.Tensor, tries: int = 4) -> str:
    """The convolution whose random weight changes give the smoothest output changes (ties: the later)."""
    g = torch.Generator().manual_seed(0)
    best, name = -1.0, None
    for layer in directions.conv_layers(model):
        w = dict(model.named_parameters())[layer]
        p = directions.patterns(model, layer, x[:8], torch.randn(tries, w.numel(), generator=g))
        share = float(directions.smooth_share(p).mean())
        if share >= best:
            best, name = share, layer
    if name is None:
        raise BadInput("the model has no convolution to carry an output mark")
    return name


def calibrate(model: nn.Module, layer: str, dirs: torch.Tensor, probes: torch.Tensor, psnr: float,
              seed: int) -> float:
    """The strength whose copies' outputs are `psnr` dB from the master's on the probes, for a random
    codeword (a mark's energy is the same for every codeword up to a few %: the subspace is orthonormal
    under the output energy). Three secant steps (`to_psnr`): the output is not exactly linear in the strength."""
    w = dict(model.named_parameters())[layer]
    c = torch.from_numpy(np.random.default_rng(seed).integers(0, 2, len(dirs)).astype(np.float32) * 2 - 1)
    delta = (c @ dirs).view_as(w) / math.sqrt(len(dirs))
    return to_psnr(model, w, delta, probes, psnr, steps=3, s=10 ** (-psnr / 20)) / math.sqrt(len(dirs))


def to_psnr(model: nn.Module, w: torch.Tensor, delta: torch.Tensor, probes: torch.Tensor, psnr: float,
            steps: int, s: float = 1.0) -> float:
    """The multiple of `delta` (a change of the weight `w`) that moves the model's outputs on the probes
    `psnr` dB from where they were, by secant steps from `s`; `w` is left as it was."""
    with torch.no_grad():
        ref = model(probes)
        original = w.detach().clone()
        try:
            for _ in range(steps):
                w.copy_(original + s * delta)
                mse = float((model(probes) - ref).pow(2).mean())
                if mse == 0:  # the change does not reach the outputs: nothing to scale
                    break
                s *= 10 ** ((10 * math.log10(1 / mse) - psnr) / 20)
        finally:
            w.copy_(original)
    return s
