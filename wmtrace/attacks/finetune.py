"""Fine-tuning on the task without any regularizer, with the habits leakers have: the optimizer
(SGD with momentum, Adam, AdamW), its rate and weight decay, light augmentation, and tuning all
layers or only the last ones."""

from __future__ import annotations

from ..errors import BadInput
from .base import Attack, Param, State, seed_param
from .trainer import OPTIMIZERS, Trainer, last_layers, state_of, train


def finetune(state: State, strength: float, trainer: Trainer, lr: float = 0.05, optimizer: str = "sgd",
             weight_decay: float | None = None, augment: bool = False, last: int = 0, callback=None) -> State:
    """`strength` epochs (fractions allowed) at the constant rate `lr` (the example master's own peak
    rate is 0.05 with SGD; Adam-family rates are some 100x lower). `weight_decay` None takes the
    optimizer's usual default; `last` > 0 tunes only the last `last` layers with weights."""
    if strength < 0:
        raise BadInput(f"finetune: strength {strength} (epochs) must be >= 0")
    if last < 0:
        raise BadInput(f"finetune: last {last} must be >= 0 (0: every layer)")
    steps = round(strength * trainer.steps_per_epoch())
    model = trainer.model(state)
    params = last_layers(model, last) if last else None
    return state_of(train(model, trainer, steps, lr, callback=callback, params=params, optimizer=optimizer,
                          weight_decay=weight_decay, augment=augment))


ATTACK = Attack(
    name="finetune",
    summary="Fine-tune on the task without any regularizer.",
    params=(
        Param("strength", float, 1.0, "Epochs of fine-tuning (fractions allowed)"),
        Param("lr", float, 0.05, "Learning rate (constant)"),
        Param("optimizer", str, "sgd", "sgd (Nesterov momentum 0.9), adam or adamw", choices=OPTIMIZERS),
        Param("weight_decay", float, None, "Weight decay [default: the optimizer's usual, 5e-4 / 0 / 0.01]",
              flag="--weight-decay"),
        Param("augment", bool, False, "Flip and shift images by up to 2 pixels"),
        Param("last", int, 0, "Tune only the last N layers with weights (0: all)"),
        seed_param(),
    ),
    run=lambda state, trainer, report, strength, lr, optimizer, weight_decay, augment, last, seed: finetune(
        state, strength, trainer, lr, optimizer, weight_decay, augment, last),
    needs_data=True,
)
