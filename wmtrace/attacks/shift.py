"""Weight shifting (after Lukas et al.): one filter per conv layer moved far, then brief fine-tuning."""

from __future__ import annotations

import torch

from ..errors import BadInput
from .base import Attack, Param, State, copy_state, seed_param
from .trainer import Trainer, state_of, train


def shift(state: State, strength: float, trainer: Trainer, steps: int = 200, lr: float = 0.01, seed: int = 0) -> State:
    """Weight shifting (after Lukas et al.): in every conv layer one random filter is moved by a random
    vector so large that the layer's filter mean (Uchida's statistic) moves by `strength` times the
    layer's weight std per element; then `steps` steps of fine-tuning at `lr` recover accuracy."""
    if strength < 0:
        raise BadInput(f"shift: strength {strength} must be >= 0")
    g = torch.Generator().manual_seed(seed)
    out = copy_state(state)
    for n, w in state.items():
        if not (w.is_floating_point() and w.dim() == 4):
            continue
        r = int(torch.randint(0, w.shape[0], (1,), generator=g))
        u = torch.randn(w.shape[1:], generator=g)
        u = u / u.pow(2).mean().sqrt()
        out[n] = w.clone()
        out[n][r] += (strength * w.shape[0] * float(w.float().std()) * u).to(w.dtype)
    return state_of(train(trainer.model(out), trainer, steps, lr))



ATTACK = Attack(
    name="shift",
    summary="Weight shifting: move one filter per conv layer, then fine-tune briefly.",
    params=(
        Param("strength", float, 0.1, "Shift of each conv layer's filter mean, in weight stds"),
        Param("steps", int, 200, "Fine-tuning steps after the shift"),
        Param("lr", float, 0.01, "Learning rate"),
        seed_param(),
    ),
    run=lambda state, trainer, report, strength, steps, lr, seed: shift(state, strength, trainer, steps, lr, seed),
    needs_data=True,
)
