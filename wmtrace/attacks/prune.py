"""Unstructured pruning: conv and linear weights set to zero, by magnitude or at random."""

from __future__ import annotations

import torch

from ..errors import BadInput
from .base import Attack, Param, State, check_fraction, copy_state, prunable, seed_param

PRUNE_MODES = ("global", "layer", "random")


def prune_global(state: State, amount: float) -> State:
    """Global unstructured magnitude pruning: zero the `amount` fraction of smallest weights
    across all prunable tensors together (as torch.nn.utils.prune.global_unstructured does)."""
    return prune(state, amount, "global")


def prune(state: State, strength: float, mode: str = "global", seed: int = 0) -> State:
    """Unstructured pruning; `strength` is the fraction of conv/linear weights set to zero.

    `global`: smallest magnitudes over all layers together; `layer`: smallest magnitudes within each
    layer, the same fraction everywhere; `random`: uniformly random weights in each layer.
    """
    check_fraction(strength, "prune")
    if mode not in PRUNE_MODES:
        raise BadInput(f"prune mode {mode!r}: use one of {', '.join(PRUNE_MODES)}")
    names = prunable(state)
    out = copy_state(state)
    if strength == 0.0 or not names:
        return out
    if mode == "global":
        flat = torch.cat([state[n].detach().abs().flatten().float() for n in names])
        k = int(strength * flat.numel())
        if k == 0:
            return out
        threshold = flat.kthvalue(k).values
        for n in names:
            out[n] = torch.where(state[n].abs() <= threshold, torch.zeros_like(state[n]), state[n])
        return out
    g = torch.Generator().manual_seed(seed)
    for n in names:
        w = state[n]
        k = int(strength * w.numel())
        if k == 0:
            continue
        score = torch.rand(w.shape, generator=g) if mode == "random" else w.detach().abs().float()
        drop = score.flatten().topk(k, largest=False).indices
        flat = w.detach().clone().flatten()
        flat[drop] = 0
        out[n] = flat.reshape(w.shape)
    return out



ATTACK = Attack(
    name="prune",
    summary="Unstructured pruning: smallest magnitudes globally or per layer, or random weights.",
    params=(
        Param("strength", float, 0.5, "Fraction of conv/linear weights set to zero"),
        Param("mode", str, "global", "global | layer (same fraction per layer) | random", choices=PRUNE_MODES),
        seed_param(),
    ),
    run=lambda state, trainer, report, strength, mode, seed: prune(state, strength, mode, seed),
)
