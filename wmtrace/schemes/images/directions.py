"""Where a buyer's mark goes in the weights of an image-to-image model, and what it does to an image.

A mark is a small change of one convolution's weights, `W + s * sum_i c_i A_i` (c_i = +-1, the codeword's
bits). What bit i does to an output is the model's directional derivative along A_i (`patterns`, one
forward-mode product per direction); reading it back needs only the reverse product: the gradient of
<output, residual> with respect to W, projected on every A_i (`project`), one backward pass per image.

The directions are chosen at `init` for what survives: from `BASE` random directions, the `bits`
combinations whose output patterns keep the largest share of their energy after 4x4 averaging (a
generalised eigenproblem on the patterns' Gram matrices over training inputs). Smooth patterns are what
JPEG, resizing, blur and a surrogate's imperfect imitation leave: on the example, JPEG 75 read from 8
output images at z 6.0 when choosing from 384 random directions, 7.1 from 1536 (the bound for 1,000
buyers at 1e-6 needs 6.4). Which combination
carries which bit is keyed (`mixing`): without the master key the subspace says nothing of a codeword.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp, vmap

from ...coding import keys

BASE = 1536  # random directions the subspace is chosen from (384: JPEG 75 read at z 6.0, 1536: 7.1)
POOL = 4  # the averaging window a pattern's smooth share is measured after
CHUNK = 32  # directions per batched forward-mode product


def conv_layers(model: nn.Module) -> list[str]:
    """Names of the 4-D convolution weights a mark may go in."""
    return [n for n, p in model.named_parameters() if p.dim() == 4 and n.endswith("weight")]


def patterns(model: nn.Module, layer: str, x: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """(n, len(dirs), C, H, W): the change of the outputs at inputs `x` per unit step along each direction.

    One forward-mode product per direction, batched (`vmap`): the primal pass runs once per chunk and
    only the layers after `layer` carry tangents, so the last layer's 1536 directions take seconds, not
    the 150 s of one full forward pass each."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    w = params[layer]

    def f(weight: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**params, layer: weight}, (x,))

    def tangent(d: torch.Tensor) -> torch.Tensor:
        return jvp(f, (w,), (d.view_as(w).to(w.dtype),))[1]

    with torch.no_grad():
        parts = [vmap(tangent)(dirs[i : i + CHUNK]) for i in range(0, len(dirs), CHUNK)]
    return torch.cat(parts).transpose(0, 1) if parts else torch.zeros(len(x), 0, *x.shape[1:])


def smooth_share(p: torch.Tensor) -> torch.Tensor:
    """Per direction: energy left after POOL x POOL averaging over the energy (1/POOL^2: perfectly smooth)."""
    n, k = p.shape[:2]
    lo = F.avg_pool2d(p.flatten(0, 1), POOL).view(n, k, -1).pow(2).sum((0, 2))
    return lo / p.flatten(2).pow(2).sum((0, 2)).clamp_min(1e-30)


def choose(model: nn.Module, layer: str, x: torch.Tensor, bits: int, seed: int,
           mirror: bool = True) -> torch.Tensor:
    """(bits, weights) directions: the smoothest `bits` combinations of BASE seeded random directions,
    orthonormal under the patterns' energy on `x` (each has unit output energy per pixel); with `mirror`,
    from mirror-symmetric kernels only."""
    w = dict(model.named_parameters())[layer]
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(max(BASE, bits), *w.shape, generator=g)
    base = (mirrored(base) if mirror else base).flatten(1)
    p = patterns(model, layer, x, base)
    flat = p.flatten(2).double()
    lo = F.avg_pool2d(p.flatten(0, 1), POOL).view(p.shape[0], p.shape[1], -1).double()
    total = torch.einsum("nif,njf->ij", flat, flat)
    smooth = torch.einsum("nif,njf->ij", lo, lo)
    total = total + 1e-3 * total.diagonal().mean() * torch.eye(len(total), dtype=torch.float64)
    inv = torch.linalg.inv(torch.linalg.cholesky(total))
    _, vec = torch.linalg.eigh(inv @ smooth @ inv.T)
    combos = (inv.T @ vec[:, -bits:]).T  # unit total energy over x
    pixels = flat.shape[0] * flat.shape[2]
    return (combos.float() @ base) * pixels**0.5


def mirrored(dirs: torch.Tensor) -> torch.Tensor:
    """Directions whose kernels are their own mirror images, left-right and top-bottom. A surrogate
    trained with flipped pairs (the usual augmentation) learns the average of the mark and its mirror
    image: a mark that is not symmetric cancels there. On the example's copies, surrogates of the copy's
    own architecture read at z 2.4-6.5 from 16 images with plain directions, 6.0-8.7 with these; JPEG
    75 at 7.1 plain, 2.9 mirrored, as a symmetric subspace has fewer smooth directions to choose from.
    Convolutions only (4-D weights)."""
    if dirs.dim() != 5:
        return dirs
    return (dirs + dirs.flip(-1) + dirs.flip(-2) + dirs.flip(-1, -2)) / 4


def mixing(key: bytes, bits: int) -> torch.Tensor:
    """The keyed orthogonal matrix that assigns the subspace's directions to codeword bits."""
    q, _ = torch.linalg.qr(torch.from_numpy(keys.projection(key, "images/mixing", bits, bits)))
    return q.float()


def keyed(key: bytes, dirs: torch.Tensor) -> torch.Tensor:
    """A_i, one row per codeword bit."""
    return mixing(key, len(dirs)) @ dirs.float()


def project(model: nn.Module, layer: str, x: torch.Tensor, residual: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """<pattern_i(x), residual> for every row A_i of `a`, summed over the batch: one backward pass."""
    w = dict(model.named_parameters())[layer]
    with torch.enable_grad():
        w.requires_grad_(True)
        try:
            (grad,) = torch.autograd.grad((model(x) * residual).sum(), w)
        finally:
            w.requires_grad_(False)
    return a @ grad.flatten().to(a.dtype)
