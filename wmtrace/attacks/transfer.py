"""Transfer learning: a new head for another task, then fine-tuning."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BadInput
from .base import Attack, Param, State, seed_param
from .trainer import Trainer, state_of, train

# Fashion-MNIST's ten classes in four coarse groups: tops (T-shirt, pullover, coat, shirt), one-piece
# and lower garments (trouser, dress), footwear (sandal, sneaker, ankle boot), bags.
COARSE_GROUPS = (0, 1, 0, 1, 0, 2, 0, 2, 3, 2)
TRANSFER_TUNE = ("all", "last")


def _head(model: nn.Module) -> str:
    """The classifier to replace: the model's last linear layer."""
    names = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if not names:
        raise BadInput("transfer: the model has no linear layer to replace with a new head")
    return names[-1]


def _new_head(model: nn.Module, classes: int, seed: int) -> str:
    """Replace the last linear layer by a freshly initialised one with `classes` outputs."""
    name = _head(model)
    old = model.get_submodule(name)
    with torch.random.fork_rng():  # a reproducible head without touching the caller's random state
        torch.manual_seed(seed)
        head = nn.Linear(old.in_features, classes, bias=old.bias is not None)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, head)
    return name


def _last_layers(model: nn.Module, head: str) -> list[nn.Parameter]:
    """The new head, the last conv layer and every module after it (its BatchNorm): what a transfer
    learner trains when the early features are kept frozen."""
    modules = list(model.named_modules())
    convs = [i for i, (_, mod) in enumerate(modules) if isinstance(mod, nn.Conv2d)]
    start = convs[-1] if convs else [n for n, _ in modules].index(head)
    return [p for _, mod in modules[start:] for p in mod.parameters(recurse=False)]


def task_accuracy(model: nn.Module, trainer: Trainer, labels: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy on the attacker's new task, over the held-out split."""
    from torch.utils.data import DataLoader

    right = total = 0
    model.eval()
    with torch.no_grad():
        for x, y in DataLoader(trainer.data("test"), batch_size=batch):
            right += int((model(x).argmax(1) == labels[y]).sum())
            total += len(y)
    return right / max(total, 1)


def transfer(
    state: State, strength: float, trainer: Trainer, lr: float = 0.01, tune: str = "all",
    groups: tuple[int, ...] = COARSE_GROUPS, report: dict | None = None, callback=None,
) -> State:
    """Transfer learning: the classifier head is replaced by a new, randomly initialised one for
    another task and the network is fine-tuned on it; `strength` is the number of epochs.

    The new task maps each original label `y` to `groups[y]` (default: Fashion-MNIST's ten classes
    in four coarse groups, `COARSE_GROUPS`; `groups` needs an entry for every label of the data), so
    the head changes shape and the result is a different model. The random head sends large gradients
    into the features at first; once it has learned a task the features already solve, they move
    less than under plain fine-tuning (BENCHMARKS.md). `tune`: `all` trains every layer, `last` only
    the new head and the last conv layer with what follows it. `report['task_accuracy']` receives the new
    task's held-out accuracy (the attacker's cost); `callback(step, model)` runs after every step.
    """
    if strength < 0:
        raise BadInput(f"transfer: strength {strength} (epochs) must be >= 0")
    if tune not in TRANSFER_TUNE:
        raise BadInput(f"transfer: tune {tune!r}: use one of {', '.join(TRANSFER_TUNE)}")
    labels = torch.tensor(groups, dtype=torch.long)
    model = trainer.model(state)
    head = _new_head(model, int(labels.max()) + 1, trainer.seed)
    params = _last_layers(model, head) if tune == "last" else None
    steps = round(strength * trainer.steps_per_epoch())
    train(model, trainer, steps, lr, callback=callback, labels=labels, params=params)
    if report is not None:
        report["task_accuracy"] = task_accuracy(model, trainer, labels)
    return state_of(model)



ATTACK = Attack(
    name="transfer",
    summary="Transfer learning: new head for another task (the labels in 4 coarse groups), then fine-tune.",
    params=(
        Param("strength", float, 1.0, "Epochs of fine-tuning on the new task (fractions allowed)"),
        Param("lr", float, 0.01, "Learning rate (SGD, Nesterov momentum 0.9)"),
        Param("mode", str, "all", "all (every layer) | last (new head + last conv layer)",
              choices=TRANSFER_TUNE, flag="--tune"),
        seed_param(),
    ),
    run=lambda state, trainer, report, strength, lr, mode, seed: transfer(
        state, strength, trainer, lr, mode, report=report),
    needs_data=True,
)
