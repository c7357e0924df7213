"""Surrogate training on a copy's output images: the copy only answers, none of its weights are kept.

The leaker queries the copy as a black box with inputs of their own, keeps its answers as the 8-bit
images an API returns, and trains a model of their own on the (input, answer) pairs (the threat of
Zhang et al., 2021, "Deep Model Intellectual Property Protection via Deep Watermarking"). The
surrogate is the copy's own architecture trained from scratch (`same`), a different, smaller U-Net
(`unet`), or a plain convolutional net with no skip connection at all (`cnn`), with an L1 or L2 loss.
A mark in the copy's weights never reaches the surrogate; a mark in the copy's output images is in
every training target, and how much of it the surrogate reproduces is what the output-image scheme
has to read in the surrogate's own outputs (`wmtrace.schemes.images`).

From files, `wmtrace attack surrogate-images COPY --model wmtrace.denoise:build --data
wmtrace.denoise:dataset` queries the copy with the training split's inputs and writes the surrogate's
weights; a `unet` or `cnn` surrogate is built again by `--model wmtrace.attacks.surrogate_images:unet`
(or `:cnn`) wherever a factory is asked for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import split
from ..denoise import psnr, quantize
from ..errors import BadInput
from .base import Attack, Param, State, seed_param
from .trainer import Trainer, state_of

ARCHS = ("same", "unet", "cnn")
LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}
QUERY_BATCH = 256  # inputs per query of the copy: its answers are computed once, in batches this size
PROBES = 16  # held-out inputs (96x96 in the test split) on which the report's PSNR to the copy is measured


class SmallUNet(nn.Module):
    """One level (full and 1/2 resolution), 24/48 channels, bilinear up-sampling, residual: another
    U-Net than the example master's (two levels, 32/48/64), the kind a leaker picks when the copy's
    architecture is unknown (53k parameters, any height and width)."""

    def __init__(self, a: int = 24, b: int = 48) -> None:
        super().__init__()

        def conv(i: int, o: int) -> nn.Conv2d:
            return nn.Conv2d(i, o, 3, padding=1)

        self.e1a, self.e1b = conv(3, a), conv(a, a)
        self.e2a, self.e2b = conv(a, b), conv(b, b)
        self.d1, self.out = conv(b + a, a), conv(a, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = F.relu
        e1 = r(self.e1b(r(self.e1a(x))))
        e2 = r(self.e2b(r(self.e2a(F.avg_pool2d(e1, 2)))))
        up = F.interpolate(e2, size=e1.shape[-2:], mode="bilinear", align_corners=False)
        return x + self.out(r(self.d1(torch.cat([up, e1], 1))))


class PlainCNN(nn.Module):
    """Six 3x3 convolutions of 48 channels with ReLU between them, no norm, no skip, no down-sampling:
    DnCNN's body without its BatchNorm or residual learning, the surrogate least like a U-Net (86k
    parameters, any size)."""

    def __init__(self, width: int = 48, depth: int = 6) -> None:
        super().__init__()
        sizes = [3] + [width] * (depth - 1) + [3]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in zip(sizes[:-1], sizes[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs[:-1]:
            x = F.relu(conv(x))
        return self.convs[-1](x)


def unet() -> nn.Module:
    """The factory of the `unet` surrogate (`--model wmtrace.attacks.surrogate_images:unet`)."""
    return SmallUNet().eval()


def cnn() -> nn.Module:
    """The factory of the `cnn` surrogate (`--model wmtrace.attacks.surrogate_images:cnn`)."""
    return PlainCNN().eval()


def loss_of(name: str, where: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in LOSSES:
        raise BadInput(f"{where}: loss {name!r}: use one of {', '.join(LOSSES)}")
    return LOSSES[name]


def check_training(steps: int, batch: int, lr: float, where: str) -> None:
    if not (steps >= 1 and batch >= 1 and lr > 0):
        raise BadInput(f"{where}: steps {steps} and batch {batch} must be >= 1, learning rate {lr} > 0")


def images(x: object, where: str) -> torch.Tensor:
    """`x` if it is a batch of RGB images in [0, 1] (N x 3 x H x W floats, N >= 1), else one BadInput line."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 4 and x.shape[1] == 3
            and x.numel() > 0):
        what = f"a {x.dtype} tensor of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise BadInput(f"{where}: expected RGB images (N x 3 x H x W floats), not {what}")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise BadInput(f"{where}: pixel values must lie in [0, 1], not [{float(x.min()):.3g}, {float(x.max()):.3g}]")
    return x


@torch.no_grad()
def answers(teacher: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
            batch: int = QUERY_BATCH) -> torch.Tensor:
    """The copy's outputs on `inputs`, queried once in batches and rounded to 8 bits as the images an
    API returns; an output that is not an image batch of the inputs' count is one BadInput line."""
    out = []
    for i in range(0, len(inputs), batch):
        y = teacher(inputs[i : i + batch])
        if not (isinstance(y, torch.Tensor) and y.dim() == 4 and len(y) == len(inputs[i : i + batch])):
            shape = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise BadInput(f"the copy's outputs are not images (N x C x H x W) but {shape}: an image-to-image "
                           "model is needed (e.g. --model wmtrace.denoise:build)")
        out.append(quantize(y.detach().float()))
    return torch.cat(out)


def student(arch: str, factory: Callable[[], nn.Module] | None, seed: int) -> nn.Module:
    """A fresh surrogate initialised from `seed + 1` without touching the caller's random state. Not
    `seed` itself: the example master was initialised from seed 0, the default, and a `same` surrogate
    starting from the master's own initial weights would start closer to the copy than a leaker could."""
    if arch not in ARCHS:
        raise BadInput(f"surrogate-images: arch {arch!r}: use one of {', '.join(ARCHS)}")
    if arch == "same" and factory is None:
        raise BadInput("surrogate-images: arch 'same' needs the copy's model factory (factory=, --model)")
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        return {"same": factory, "unet": unet, "cnn": cnn}[arch]()


def fit(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss: str = "l2", steps: int = 1500,
        batch: int = 32, lr: float = 2e-3, seed: int = 0, progress=None) -> nn.Module:
    """Train `model` to map `inputs` to `targets`: Adam under a one-cycle schedule peaking at `lr`,
    batches drawn at random and flipped left-right half the time (input and target alike), all from
    `seed`. `progress(step, loss)` runs after every step. Returns the model in eval mode."""
    check_training(steps, batch, lr, "surrogate-images")
    criterion = loss_of(loss, "surrogate-images")
    opt = torch.optim.Adam(model.parameters(), lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps) if steps > 1 else None
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        pick = torch.randint(len(inputs), (batch,), generator=g).to(inputs.device)
        flip = (torch.rand(len(pick), generator=g) < 0.5)[:, None, None, None].to(inputs.device)
        x, y = inputs[pick], targets[pick]
        x, y = torch.where(flip, x.flip(3), x), torch.where(flip, y.flip(3), y)
        value = criterion(model(x), y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if progress is not None:
            progress(step + 1, float(value))
    return model.eval()


def surrogate_images(
    teacher: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, arch: str = "unet", loss: str = "l2",
    steps: int = 1500, batch: int = 32, lr: float = 2e-3, seed: int = 0,
    factory: Callable[[], nn.Module] | None = None, progress=None, device: str | torch.device = "cpu",
) -> nn.Module:
    """A surrogate of the black box `teacher` (a batch N x 3 x H x W in [0, 1] to output images),
    trained on `inputs` (the leaker's own, e.g. 5000 noisy 32x32 crops) and the teacher's 8-bit answers
    to them (`answers`). `arch`: `same` (built by `factory`, the copy's architecture trained from
    scratch; required for it), `unet` (`SmallUNet`) or `cnn` (`PlainCNN`); `loss`: `l1` or `l2`. The
    training is `fit`'s, on `device` (a GPU makes the benchmark's 18 surrogates minutes, not hours).
    Returns the trained surrogate in eval mode, on `device`; the teacher is only called."""
    model = student(arch, factory, seed)  # arguments checked before the teacher is queried
    loss_of(loss, "surrogate-images")
    check_training(steps, batch, lr, "surrogate-images")
    inputs = images(inputs, "surrogate-images inputs")
    targets = answers(teacher, inputs)
    if targets.shape[1] != 3:
        raise BadInput(f"surrogate-images: the copy answers {targets.shape[1]} channels; RGB images are needed")
    return fit(model.to(device), inputs.to(device), targets.to(device), loss, steps, batch, lr, seed, progress)


@torch.no_grad()
def psnr_to(model: nn.Module, teacher: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> float:
    """PSNR in dB of `model`'s 8-bit outputs to the teacher's on `inputs`: how much of the copy was stolen."""
    return psnr(answers(model.eval(), inputs), answers(teacher, inputs))


def inputs_of(data: torch.utils.data.Dataset, count: int, where: str) -> torch.Tensor:
    """The first `count` inputs of a dataset (items may be inputs alone or (input, target) pairs)."""
    if count < 1:
        raise BadInput(f"{where}: pairs {count} must be >= 1")
    n = min(count, len(data))
    if n == 0:
        raise BadInput(f"{where}: the attacker's data are empty")
    return images(torch.stack([split(data[i])[0] for i in range(n)]), where)


def _run(state: State, trainer: Trainer, report: dict, arch: str, loss: str, pairs: int, steps: int, lr: float,
         seed: int) -> State:
    """From files: the copy built by the trainer's factory answers the first `pairs` inputs of the
    training split (fewer if the split is smaller: `report['pairs']` says how many); the report gets
    the surrogate's PSNR to the copy on the first `PROBES` inputs of the test split (`psnr_to_copy`)."""
    copy = trainer.model(state).eval()
    factory = trainer.factory if arch == "same" else None
    x = inputs_of(trainer.data("train"), pairs, "surrogate-images")
    model = surrogate_images(copy, x, arch, loss, steps, lr=lr, seed=seed, factory=factory)
    report["pairs"] = len(x)
    report["psnr_to_copy"] = round(psnr_to(model, copy, inputs_of(trainer.data("test"), PROBES, "test split")), 2)
    return state_of(model)


ATTACK = Attack(
    name="surrogate-images",
    summary="Train a surrogate of an image-to-image copy on its 8-bit answers to the attacker's own inputs "
            "(the copy's architecture from scratch, another U-Net, or a plain CNN).",
    params=(
        Param("arch", str, "unet", "Surrogate: same (--model, from scratch), unet (smaller, one level) or cnn (plain)",
              choices=ARCHS),
        Param("loss", str, "l2", "Training loss against the copy's answers", choices=tuple(LOSSES)),
        Param("pairs", int, 5000, "Inputs the copy is queried with (the first of the training split)"),
        Param("steps", int, 1500, "Training steps (batch 32, Adam, one-cycle schedule)"),
        Param("lr", float, 2e-3, "Peak learning rate of the one-cycle schedule"),
        seed_param("Random seed: the surrogate's initialisation, batches and flips"),
    ),
    run=_run,
    needs_data=True,
)
