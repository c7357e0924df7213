"""The image-to-image example: a small U-Net that removes Gaussian noise from real photographs.

It is the master of the output-image scheme (`schemes/images`): a per-buyer mark in every image a copy
produces. The network is trained by wmtrace on crops of the photographs scikit-image ships (the
`vision` extra; the same files on every machine, so the shipped weights are reproducible with
`python -m wmtrace.denoise train`), noise sigma 25/255 on 8-bit images, and the weights ship with the
package (`denoise.safetensors`, 0.7 MB): training takes 3.5 minutes on 2 cores, longer than a test
may. The photographs are split whole as in `wmtrace.vision` (train / test / unseen).

    wmtrace init --name denoiser --weights "$(python -m wmtrace.denoise weights)" \\
        --model wmtrace.denoise:build --data wmtrace.denoise:dataset --schemes whitebox,images
    wmtrace issue --master denoiser --buyers 3

Why a U-Net: its coarse path (1/2 and 1/4 resolution) is where a mark can be smooth, and smooth marks
are what JPEG, resizing and surrogate training leave (BENCHMARKS.md, *Marks in output images*).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from . import vision
from .errors import BadInput
from .formats.images import quantize

SIGMA = 25 / 255  # noise std on [0, 1] images
CROP = {"train": 32, "test": 96, "unseen": 96}  # training crops are small (speed); test crops are probes
COUNT = {"train": 4096, "test": 64, "unseen": 64}
WEIGHTS = Path(__file__).with_name("denoise.safetensors")
SPLITS = tuple(CROP)


class UNet(nn.Module):
    """Two-level U-Net (full, 1/2, 1/4 resolution; 182k parameters), residual: output = input + net."""

    def __init__(self, a: int = 32, b: int = 48, c: int = 64) -> None:
        super().__init__()

        def conv(i: int, o: int) -> nn.Conv2d:
            return nn.Conv2d(i, o, 3, padding=1)

        self.e1a, self.e1b = conv(3, a), conv(a, a)
        self.e2a, self.e2b = conv(a, b), conv(b, b)
        self.e3a, self.e3b = conv(b, c), conv(c, c)
        self.d2, self.d1, self.out = conv(c + b, b), conv(b + a, a), conv(a, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = F.relu
        e1 = r(self.e1b(r(self.e1a(x))))
        e2 = r(self.e2b(r(self.e2a(F.avg_pool2d(e1, 2)))))
        e3 = r(self.e3b(r(self.e3a(F.avg_pool2d(e2, 2)))))
        d2 = r(self.d2(torch.cat([_up(e3, e2), e2], 1)))
        d1 = r(self.d1(torch.cat([_up(d2, e1), e1], 1)))
        return x + self.out(d1)


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def build() -> nn.Module:
    """The factory named `wmtrace.denoise:build` in registries (any height and width divisible by 4)."""
    return UNet().eval()


def weights() -> Path:
    if not WEIGHTS.is_file():
        raise BadInput(f"{WEIGHTS}: the denoiser's weights are not installed (python -m wmtrace.denoise train)")
    return WEIGHTS


class Pairs(Dataset):
    """Fixed crops of a split's photographs: item i is (noisy input, clean target), both 3 x S x S in
    [0, 1] on the 8-bit grid, the same on every call (noise seeded by split and index)."""

    def __init__(self, split: str, count: int | None = None, clean: bool = True) -> None:
        if split not in CROP:
            raise BadInput(f"unknown split {split!r} (use {', '.join(CROP)})")
        self.split, self.size, self.clean = split, CROP[split], clean
        self.count = COUNT[split] if count is None else count
        self.photos = [p for _, p in vision.photographs(split, mate=False)]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        if not 0 <= i < self.count:
            raise IndexError(i)
        rng = np.random.default_rng([SPLITS.index(self.split), i])
        img = self.photos[i % len(self.photos)]
        h, w = img.shape[:2]
        y, x = rng.integers(0, h - self.size + 1), rng.integers(0, w - self.size + 1)
        clean = torch.from_numpy(img[y : y + self.size, x : x + self.size].copy()).permute(2, 0, 1).float() / 255
        noise = torch.from_numpy(rng.standard_normal(clean.shape).astype(np.float32))
        noisy = quantize(clean + SIGMA * noise)
        return (noisy, clean) if self.clean else noisy


def dataset(split: str) -> Dataset:
    """The data entry point `init` takes: noisy inputs alone (train: 32x32, test and unseen: 96x96)."""
    return Pairs(split, clean=False)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (the task metric, and the mark's visibility)."""
    mse = float(F.mse_loss(a.clamp(0, 1).double(), b.double()))
    return float("inf") if mse == 0 else 10 * float(np.log10(1 / mse))


@torch.no_grad()
def task_psnr(model: nn.Module, split: str = "test", count: int | None = None) -> float:
    """The model's PSNR against the clean targets of a split (outputs on the 8-bit grid)."""
    data = Pairs(split, count)
    x = torch.stack([data[i][0] for i in range(len(data))])
    clean = torch.stack([data[i][1] for i in range(len(data))])
    return psnr(quantize(model.eval()(x)), clean)


def train(out: Path, steps: int = 2500, seed: int = 0) -> float:
    """Train the example (Adam, one-cycle, batch 32 of 32x32 crops) and write its weights; returns the
    test PSNR. 2500 steps: 31.7 dB against 20.4 dB for the noisy inputs, 3.5 min on 2 cores."""
    from .formats import save_safetensors

    torch.manual_seed(seed)
    model = UNet()
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    data = Pairs("train", 20000)
    start = time.time()
    for step in range(steps):
        batch = [data[int(i)] for i in torch.randint(len(data), (32,))]
        x, clean = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
        loss = F.mse_loss(model(x), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0:
            print(f"step {step}/{steps} loss {float(loss):.5f} {time.time() - start:.0f} s", flush=True)
    save_safetensors({k: v.detach().contiguous() for k, v in model.state_dict().items()}, out)
    return task_psnr(model)


if __name__ == "__main__":  # `python -m wmtrace.denoise weights|train [OUT]`
    if sys.argv[1:2] == ["train"]:
        target = Path(sys.argv[2]) if len(sys.argv) > 2 else WEIGHTS
        print(f"test PSNR {train(target):.2f} dB -> {target}")
    else:
        from .modelio import weights_command

        weights_command("wmtrace.denoise", weights)
