"""Gaussian noise on the weights."""

from __future__ import annotations

import torch

from ..errors import BadInput
from .base import Attack, Param, State, copy_state, prunable, seed_param


def noise(state: State, strength: float, seed: int = 0) -> State:
    """Gaussian noise on every conv/linear weight; `strength` is its std relative to that tensor's std."""
    if strength < 0:
        raise BadInput(f"noise: strength {strength} must be >= 0")
    g = torch.Generator().manual_seed(seed)
    out = copy_state(state)
    for n in prunable(state):
        w = state[n]
        out[n] = w + strength * w.float().std() * torch.randn(w.shape, generator=g).to(w.dtype)
    return out



ATTACK = Attack(
    name="noise",
    summary="Gaussian noise on every conv/linear weight.",
    params=(Param("strength", float, 0.1, "Noise std relative to each weight tensor's std"), seed_param()),
    run=lambda state, trainer, report, strength, seed: noise(state, strength, seed),
)
