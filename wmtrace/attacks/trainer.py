"""The harness of the attacks that train: the model code, the attacker's data, and plain SGD.

Attacks that train (`finetune`, `transfer`, `overwrite`, `shift`, `distill`) and `project` need the
model code and data: a `module:factory` and a `module:function(split)` data entry point, the example
CNN and Fashion-MNIST by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInput
from .base import State


@dataclass
class Trainer:
    """What training attacks need: the model code and the attacker's data."""

    factory: Callable[[], nn.Module]
    data: Callable[[str], torch.utils.data.Dataset]
    batch_size: int = 64
    seed: int = 0

    def model(self, state: State) -> nn.Module:
        m = self.factory()
        try:
            missing, unexpected = m.load_state_dict(state, strict=False)
        except Exception as e:
            raise BadInput(f"the weights do not fit the model ({str(e).splitlines()[0][:160]})") from e
        # Tensors the model lacks (an unused pooler, extra heads) are left out; missing ones are an error.
        bad = [k for k in missing if not k.endswith("num_batches_tracked")]
        if bad:
            raise BadInput(f"the weights do not fit the model ({bad[0]!r})")
        return m

    def batches(self) -> Iterator:
        """Endless shuffled batches of the training split, in an order fixed by `seed`."""
        from torch.utils.data import DataLoader

        g = torch.Generator().manual_seed(self.seed)
        ds = self.data("train")
        while True:
            yield from DataLoader(ds, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=g)

    def steps_per_epoch(self) -> int:
        return max(1, len(self.data("train")) // self.batch_size)


def train(
    model: nn.Module, trainer: Trainer, steps: int, lr: float, extra=None, callback=None,
    labels: torch.Tensor | None = None, params: list[nn.Parameter] | None = None,
) -> nn.Module:
    """Plain SGD (Nesterov momentum 0.9, weight decay 5e-4, as the example master), BatchNorm in
    train mode, constant learning rate; `extra(model)` adds a loss term; `callback(step, model)`
    runs after every step (to snapshot a sweep from one run); `labels` maps the data's labels to
    another task's; `params` limits training to those parameters (default: all)."""
    opt = sgd(list(model.parameters()) if params is None else params, lr)
    model.train()
    batches = trainer.batches()
    for step in range(steps):
        batch = next(batches)
        x, y = batch[0], batch[1]
        if labels is not None:
            y = labels[y]
        loss = F.cross_entropy(model(x), y)
        if extra is not None:
            loss = loss + extra(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if callback is not None:
            callback(step + 1, model)
    return model.eval()


def sgd(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimizer of every training attack: the example master's own (SGD, Nesterov momentum 0.9,
    weight decay 5e-4), at a constant rate."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)


def state_of(model: nn.Module) -> State:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
