"""Fine-tuning on the task without any regularizer."""

from __future__ import annotations

from ..errors import BadInput
from .base import Attack, Param, State, seed_param
from .trainer import Trainer, state_of, train


def finetune(state: State, strength: float, trainer: Trainer, lr: float = 0.05, callback=None) -> State:
    """Fine-tuning on the task without any regularizer; `strength` is the number of epochs (fractions
    allowed) at learning rate `lr` (the example master's own peak rate is 0.05)."""
    if strength < 0:
        raise BadInput(f"finetune: strength {strength} (epochs) must be >= 0")
    steps = round(strength * trainer.steps_per_epoch())
    return state_of(train(trainer.model(state), trainer, steps, lr, callback=callback))



ATTACK = Attack(
    name="finetune",
    summary="Fine-tune on the task without any regularizer.",
    params=(
        Param("strength", float, 1.0, "Epochs of fine-tuning (fractions allowed)"),
        Param("lr", float, 0.05, "Learning rate (SGD, Nesterov momentum 0.9)"),
        seed_param(),
    ),
    run=lambda state, trainer, report, strength, lr, seed: finetune(state, strength, trainer, lr),
    needs_data=True,
)
