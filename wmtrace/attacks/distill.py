"""Knowledge distillation into a fresh model: the copy only teaches, none of its weights are kept.

The leaker builds a new, randomly initialised model (the copy's architecture, or another that
`--model` builds) and trains it on their own data, without labels, to match the copy's softened
outputs (Hinton et al.'s KL loss at a temperature) or, as from an API that returns labels only, its
top-1 labels. A white-box mark lives in the copy's weights, and the student never sees them: it
learns the copy's function, not its parameters, so the mark is not expected to survive. What must
hold is that tracing the student names nobody innocent; naming the leaker after distillation is the
job of the black-box mark (`wmtrace query student.safetensors` runs the student as a black box).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import Inputs, call, split
from ..errors import BadInput
from .base import Attack, Param, State, seed_param
from .trainer import Trainer, sgd, state_of

ANSWERS = ("soft", "hard")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) over outputs softened by `temperature`, times temperature^2 so the
    gradient's scale does not shrink as the temperature grows (Hinton et al., 2015)."""
    t = temperature
    target = F.log_softmax(teacher / t, dim=-1)
    return F.kl_div(F.log_softmax(student / t, dim=-1), target, log_target=True, reduction="batchmean") * t * t


def fresh(trainer: Trainer) -> nn.Module:
    """A new model from the factory, initialised from `trainer.seed + 1` without touching the caller's
    random state: the same seed gives the same student. Not `trainer.seed` itself: the example master
    is initialised from seed 0, the default, and a student starting from the master's own initial
    weights would start closer to the copy than an attacker could."""
    with torch.random.fork_rng():
        torch.manual_seed(trainer.seed + 1)
        return trainer.factory()


def agreement(student: nn.Module, teacher: nn.Module, trainer: Trainer, batch: int = 1000) -> float:
    """Top-1 agreement of student and teacher on the held-out split: how much of the copy was stolen."""
    from torch.utils.data import DataLoader

    same = total = 0
    student.eval()
    with torch.no_grad():
        for b in DataLoader(trainer.data("test"), batch_size=batch):
            x: Inputs = split(b)[0]
            s, t = call(student, x).argmax(-1), call(teacher, x).argmax(-1)
            same += int((s == t).sum())
            total += len(s)
    return same / max(total, 1)


def distill(
    state: State, strength: float, trainer: Trainer, lr: float = 0.05, temperature: float = 4.0,
    report: dict | None = None, callback=None, answers: str = "soft",
) -> State:
    """Distil the copy (`state`, the teacher, in eval mode) into a fresh model built by
    `trainer.factory` and seeded from `trainer.seed` (`fresh`); `strength` is the number of epochs of the
    attacker's training split (fractions allowed), whose labels are never read. Plain SGD as the other
    training attacks (`trainer.sgd`) at the constant rate `lr`, student BatchNorm in train mode.
    `report['agreement']` receives the student's top-1 agreement with the copy on the held-out split;
    `callback(step, model)` runs after every step (to snapshot a sweep from one run). `answers="hard"`:
    the student learns the copy's top-1 labels only (cross-entropy), as from an API that returns labels."""
    if strength < 0:
        raise BadInput(f"distill: strength {strength} (epochs) must be >= 0")
    if not temperature > 0:
        raise BadInput(f"distill: temperature {temperature} must be > 0")
    if answers not in ANSWERS:
        raise BadInput(f"distill: answers {answers!r}: use {' or '.join(ANSWERS)}")
    teacher = trainer.model(state).eval()
    student = fresh(trainer)
    opt = sgd(list(student.parameters()), lr)
    student.train()
    batches = trainer.batches()
    for step in range(round(strength * trainer.steps_per_epoch())):
        x = split(next(batches))[0]  # inputs only: the student learns from the teacher, not the labels
        with torch.no_grad():
            target = call(teacher, x)
        if answers == "hard":
            loss = F.cross_entropy(call(student, x), target.argmax(-1))
        else:
            loss = kd_loss(call(student, x), target, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if callback is not None:
            callback(step + 1, student)
    student.eval()
    if report is not None:
        report["agreement"] = agreement(student, teacher, trainer)
    return state_of(student)


ATTACK = Attack(
    name="distill",
    summary="Distil the copy into a fresh model (--model: same or another architecture) on the attacker's own "
            "unlabeled data, from its soft scores or its top-1 labels.",
    params=(
        Param("strength", float, 1.0, "Epochs of distillation on the attacker's data (fractions allowed)"),
        Param("lr", float, 0.05, "Learning rate (SGD, Nesterov momentum 0.9)"),
        Param("temperature", float, 4.0, "Softmax temperature of the copy's and the student's outputs"),
        Param("answers", str, "soft", "What the student learns from: the copy's soft scores or top-1 labels",
              choices=ANSWERS),
        seed_param("Random seed: the fresh model's initialisation and the data order"),
    ),
    run=lambda state, trainer, report, strength, lr, temperature, answers, seed: distill(
        state, strength, trainer, lr, temperature, report=report, answers=answers),
    needs_data=True,
)
