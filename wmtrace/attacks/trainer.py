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
    optimizer: str = "sgd", weight_decay: float | None = None, augment: bool = False,
) -> nn.Module:
    """BatchNorm in train mode, constant learning rate; `optimizer` is one of `OPTIMIZERS` (default:
    the example master's own SGD), `weight_decay` None takes that optimizer's usual default;
    `augment` flips and shifts image batches; `extra(model)` adds a loss term; `callback(step, model)`
    runs after every step (to snapshot a sweep from one run); `labels` maps the data's labels to
    another task's; `params` limits training to those parameters (default: all)."""
    opt = make_optimizer(list(model.parameters()) if params is None else params, lr, optimizer, weight_decay)
    model.train()
    batches = trainer.batches()
    g = torch.Generator().manual_seed(trainer.seed + 1)
    for step in range(steps):
        batch = next(batches)
        x, y = batch[0], batch[1]
        if augment:
            x = flip_and_shift(x, g)
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


# The optimizers a leaker fine-tunes with, and each one's usual weight decay when none is given: the
# example master's SGD (Nesterov momentum 0.9, 5e-4), Adam (none) and AdamW (PyTorch's 0.01).
OPTIMIZERS = ("sgd", "adam", "adamw")
DEFAULT_DECAY = {"sgd": 5e-4, "adam": 0.0, "adamw": 0.01}
# Light augmentation: a horizontal flip half the time and a shift of up to this many pixels.
SHIFT_PIXELS = 2


def make_optimizer(params: list[nn.Parameter], lr: float, name: str = "sgd",
                   weight_decay: float | None = None) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise BadInput(f"optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
    wd = DEFAULT_DECAY[name] if weight_decay is None else weight_decay
    if not (lr > 0 and wd >= 0):
        raise BadInput(f"learning rate {lr} must be > 0 and weight decay {wd} >= 0")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd, nesterov=True)
    return (torch.optim.Adam if name == "adam" else torch.optim.AdamW)(params, lr=lr, weight_decay=wd)


def sgd(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimizer of the training attacks that do not choose one: the example master's own (SGD,
    Nesterov momentum 0.9, weight decay 5e-4), at a constant rate."""
    return make_optimizer(params, lr)


def flip_and_shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Image batches (N x C x H x W) flipped left-right at random and shifted by up to `SHIFT_PIXELS`
    (edges repeated), each image on its own draw: the light augmentation of a typical fine-tuning recipe."""
    if not (isinstance(x, torch.Tensor) and x.dim() == 4):
        raise BadInput("augmentation needs image batches (N x C x H x W tensors)")
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    p = SHIFT_PIXELS
    padded = F.pad(x, (p, p, p, p), mode="replicate")  # edges are background: no frame of a new colour
    c, wide = x.shape[1], w + 2 * p
    dy, dx = (torch.randint(0, 2 * p + 1, (n,), generator=g) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, wide)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def last_layers(model: nn.Module, count: int) -> list[nn.Parameter]:
    """The parameters from the `count`-th last weight matrix or kernel on (with the norms and biases
    after it): what "tune only the last layers" means for a sequential network."""
    named = list(model.named_parameters())
    weights = [i for i, (_, p) in enumerate(named) if p.dim() >= 2]
    if not 1 <= count <= len(weights):
        raise BadInput(f"last {count} layers: the model has {len(weights)} layers with weights")
    return [p for _, p in named[weights[-count]:]]


def state_of(model: nn.Module) -> State:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
