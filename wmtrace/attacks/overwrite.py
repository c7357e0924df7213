"""Overwriting: the attacker embeds their own Uchida et al. watermark in the same layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInput
from .base import Attack, Param, State, seed_param
from .trainer import Trainer, state_of, train


def overwrite(
    state: State, strength: float, trainer: Trainer, lam: float = 0.01, bits: int = 256, lr: float = 0.01,
    report: dict | None = None, callback=None,
) -> State:
    """The attacker embeds their own Uchida et al. watermark: own random key and bits, the same
    carrier layers wmtrace would choose, regularizer weight `lam` (0.01 as in the paper) on the raw
    filter mean, trained with the task loss. `strength` is the number of training steps.
    `report['attacker_ber']` receives the bit error rate of the attacker's own mark afterwards."""
    from ..schemes.whitebox.carriers import select

    if strength < 0:
        raise BadInput(f"overwrite: strength {strength} (steps) must be >= 0")
    chosen = select(state, bits)
    g = torch.Generator().manual_seed(trainer.seed + 1)
    keys = {c.name: torch.randn(c.bits, c.dim, generator=g) for c in chosen}
    targets = {c.name: torch.randint(0, 2, (c.bits,), generator=g).float() for c in chosen}
    model = trainer.model(state)

    def uchida(m: nn.Module) -> torch.Tensor:
        params = dict(m.named_parameters())
        total = 0.0
        for name, x in keys.items():
            w = params[name]
            logits = x @ w.reshape(w.shape[0], -1).mean(0)
            total = total + F.binary_cross_entropy_with_logits(logits, targets[name], reduction="sum")
        return lam * total

    train(model, trainer, int(strength), lr, uchida, callback)
    if report is not None:
        params = dict(model.named_parameters())
        wrong = sum(
            int(((x @ params[n].detach().reshape(params[n].shape[0], -1).mean(0) > 0).float() != targets[n]).sum())
            for n, x in keys.items()
        )
        report["attacker_ber"] = wrong / sum(c.bits for c in chosen)
    return state_of(model)



ATTACK = Attack(
    name="overwrite",
    summary="Embed the attacker's own Uchida watermark (own key, 256 bits, lambda 0.01) in the same layers.",
    params=(
        Param("strength", float, 300, "Training steps embedding the attacker's own mark"),
        Param("lr", float, 0.01, "Learning rate"),
        seed_param(),
    ),
    run=lambda state, trainer, report, strength, lr, seed: overwrite(state, strength, trainer, lr=lr, report=report),
    needs_data=True,
)
