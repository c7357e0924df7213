"""Fine-tuning an image-to-image copy on clean pairs: the leaker's own (noisy input, clean target) data.

Unlike a surrogate (`surrogate_images`), the leaker keeps the copy's weights and moves them: a few
hundred steps of the task's own loss at a small rate, with the optimizer a leaker would reach for. A
mark in the copy's output images is not in the clean targets, so fine-tuning pulls the outputs
towards marks-free images; what the output-image scheme must still read is what is left after a
fine-tuning that keeps the task (a leaker will not ship a copy that denoises worse).

From files, `wmtrace attack finetune-images COPY --model wmtrace.denoise:build --data
wmtrace.denoise:Pairs` (a data entry point whose items are (input, target) pairs: `denoise:Pairs`, not
`denoise:dataset`, which gives the noisy inputs alone).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import Dataset

from ..denoise import psnr, quantize
from ..errors import BadInput
from .base import Attack, Param, State, seed_param
from .surrogate_images import LOSSES, check_training, images, loss_of
from .trainer import OPTIMIZERS, Trainer, make_optimizer, state_of

PROBES = 16  # held-out pairs on which the report's task PSNR is measured


def pair_batch(pairs: Dataset, index: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The items at `index` stacked into (inputs, targets); items that are not (input, target) pairs of
    same-shaped images are one BadInput line."""
    xs, ys = [], []
    for i in index.tolist():
        item = pairs[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor)
                and isinstance(item[1], torch.Tensor) and item[0].shape == item[1].shape):
            raise BadInput(f"{where}: the data's items must be (input, target) image pairs of one shape "
                           "(e.g. --data wmtrace.denoise:Pairs)")
        xs.append(item[0])
        ys.append(item[1])
    return images(torch.stack(xs), where), images(torch.stack(ys), where)


def finetune_images(model: nn.Module, pairs: Dataset, steps: int = 500, lr: float = 1e-4, loss: str = "l2",
                    optimizer: str = "adam", batch: int = 32, seed: int = 0) -> nn.Module:
    """A fine-tuned copy of `model` (which is not changed): `steps` batches of `batch` (noisy, clean)
    items of `pairs` drawn at random from `seed`, the `loss` (`l1` or `l2`) of its outputs to the clean
    targets, `optimizer` (`adam`, `sgd` with Nesterov momentum, `adamw`; their usual weight decay,
    `trainer.make_optimizer`) at the constant rate `lr`. Returned in eval mode."""
    criterion = loss_of(loss, "finetune-images")
    check_training(steps, batch, lr, "finetune-images")
    if optimizer not in OPTIMIZERS:
        raise BadInput(f"finetune-images: optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if len(pairs) == 0:
        raise BadInput("finetune-images: the attacker's pairs are empty")
    tuned = copy.deepcopy(model).train()
    opt = make_optimizer(list(tuned.parameters()), lr, optimizer)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = pair_batch(pairs, torch.randint(len(pairs), (batch,), generator=g), "finetune-images")
        value = criterion(tuned(x), y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    return tuned.eval()


@torch.no_grad()
def task_psnr(model: nn.Module, pairs: Dataset, count: int = PROBES) -> float:
    """PSNR in dB of the model's 8-bit outputs to the clean targets of the first `count` pairs."""
    x, y = pair_batch(pairs, torch.arange(min(count, len(pairs))), "test split")
    return psnr(quantize(model.eval()(x)), y)


def _run(state: State, trainer: Trainer, report: dict, steps: int, lr: float, loss: str, optimizer: str,
         batch: int, seed: int) -> State:
    """From files: the copy built by the trainer's factory, tuned on its training split's pairs; the
    report gets the task PSNR before and after on the first `PROBES` pairs of the test split."""
    model = trainer.model(state).eval()
    tuned = finetune_images(model, trainer.data("train"), steps, lr, loss, optimizer, batch, seed)
    test = trainer.data("test")
    report["task_psnr_before"] = round(task_psnr(model, test), 2)
    report["task_psnr"] = round(task_psnr(tuned, test), 2)
    return state_of(tuned)


ATTACK = Attack(
    name="finetune-images",
    summary="Fine-tune an image-to-image copy on the attacker's (noisy, clean) pairs (--data wmtrace.denoise:Pairs).",
    params=(
        Param("steps", int, 500, "Training steps"),
        Param("lr", float, 1e-4, "Learning rate (constant)"),
        Param("loss", str, "l2", "Loss of the outputs to the clean targets", choices=tuple(LOSSES)),
        Param("optimizer", str, "adam", "adam, sgd (Nesterov momentum 0.9) or adamw", choices=OPTIMIZERS),
        Param("batch", int, 32, "Pairs per step"),
        seed_param("Random seed: the batches drawn"),
    ),
    run=_run,
    needs_data=True,
)
