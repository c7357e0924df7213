"""The bundled example: a small Fashion-MNIST CNN that wmtrace trains itself and uses as a master.

Factory `wmtrace.example:build`, data entry point `wmtrace.example:dataset`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from . import fidelity, formats
from .data import load_fashion_mnist
from .errors import BadInput

WIDTHS = (16, 32, 64, 64)


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FashionCNN(nn.Module):
    """Four conv layers with BatchNorm and a linear head: 28x28 -> 14x14 -> 7x7 -> 10 classes.
    `widths` (output channels per conv) differ from the default only for structurally pruned or
    widened copies (see `build_like`)."""

    def __init__(self, widths: tuple[int, int, int, int] = WIDTHS) -> None:
        super().__init__()
        a, b, c, d = widths
        self.features = nn.Sequential(
            *_block(1, a),
            *_block(a, b),
            nn.MaxPool2d(2),
            *_block(b, c),
            nn.MaxPool2d(2),
            *_block(c, d),
        )
        self.head = nn.Linear(d * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def build() -> nn.Module:
    """The factory named `wmtrace.example:build` in registries."""
    return FashionCNN()


def build_like(state: dict[str, torch.Tensor]) -> nn.Module:
    """The example CNN with the channel widths found in `state` (after structured pruning or dummy
    channels), loaded with it: what an attacker would rebuild to run a reshaped copy."""
    widths = tuple(int(state[f"features.{i}.weight"].shape[0]) for i in (0, 3, 7, 11))
    model = FashionCNN(widths)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.endswith("num_batches_tracked")] + list(unexpected)
    if bad:
        raise BadInput(f"weights do not fit the example CNN ({bad[0]!r})")
    return model.eval()


def dataset(split: str) -> TensorDataset:
    """Fashion-MNIST `train` (60,000) or `test` (10,000); honours $WMTRACE_DATA."""
    return TensorDataset(*load_fashion_mnist(split))


def train_master(
    out_path: str | os.PathLike,
    *,
    epochs: int = 2,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 0.05,
    data_dir: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Train the example master from scratch and save it as safetensors; returns its metrics
    (`seconds` is the training loop alone, without data loading and evaluation)."""
    torch.manual_seed(seed)
    x, y = load_fashion_mnist("train", data_dir, limit)
    x_test, y_test = load_fashion_mnist("test", data_dir)
    steps_per_epoch = len(x) // batch_size
    total = epochs * steps_per_epoch
    if total < 1:
        raise BadInput(f"nothing to train: {len(x)} images, batch size {batch_size}, {epochs} epochs")

    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    g = torch.Generator().manual_seed(seed)

    t0, step = time.perf_counter(), 0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if progress is not None:
                progress(step, total)
    seconds = time.perf_counter() - t0

    accuracy = fidelity.evaluate(model, x_test, y_test)
    metadata = {
        "test_accuracy": f"{accuracy:.4f}",
        "epochs": str(epochs),
        "seed": str(seed),
        "arch": "wmtrace.example:build",
    }
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    formats.save_safetensors(model.state_dict(), out_path, metadata)  # tmp file + os.replace
    return {"test_accuracy": accuracy, "epochs": epochs, "seconds": seconds, "steps": step}
